-- expect: 5: split sizes add up to 40 but the tensor has 64 features
local nn = require "realm.nn"
local blk = function(g, x, ctx)
  local h = nn.linear(g, x, 64, "h")
  local a, b = g:split(h, {20, 20})
  return a
end
return nn.model { d_model = 64, blocks = { blk } }
