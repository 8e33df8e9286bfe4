-- expect: 5: 'hidden' must be an integer, got 2.5
local nn = require "realm.nn"
return nn.model {
  d_model = 64,
  blocks = { nn.swiglu { hidden = 2.5 } },
}
