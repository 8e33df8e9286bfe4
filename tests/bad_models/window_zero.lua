-- expect: 5: 'window' must be positive, got 0
local nn = require "realm.nn"
return nn.model {
  d_model = 64,
  blocks = { nn.mamba3 {}, nn.attention { heads = 2, window = 0 } },
}
