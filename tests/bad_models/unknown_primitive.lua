-- expect: 4: attempt to call a nil value (method 'frobnicate')
local nn = require "realm.nn"
local weird = nn.block { kind = "weird", build = function(g, x, ctx)
  return g:frobnicate(x)
end }
return nn.model { d_model = 64, blocks = { weird } }
