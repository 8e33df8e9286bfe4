-- expect: 6: add: shape mismatch
local nn = require "realm.nn"
local bad = nn.block { kind = "bad", build = function(g, x, ctx)
  local a = nn.linear(g, x, 32, "a")
  local b = nn.linear(g, x, 48, "b")
  return a + b
end }
return nn.model { d_model = 64, blocks = { bad } }
