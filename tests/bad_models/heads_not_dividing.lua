-- expect: 6: d_model (64) is not divisible by heads (3)
local nn = require "realm.nn"
return nn.model {
  d_model = 64,
  blocks = {
    nn.attention { heads = 3, window = 32 },
  },
}
