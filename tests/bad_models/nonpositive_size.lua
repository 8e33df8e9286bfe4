-- expect: 3: 'd_model' must be positive, got 0
local nn = require "realm.nn"
return nn.model { d_model = 0, blocks = { nn.swiglu { hidden = 8 } } }
