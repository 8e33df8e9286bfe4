-- expect: 6: 'heads' must be a number, got string
local nn = require "realm.nn"
return nn.model {
  d_model = 64,
  blocks = {
    nn.attention { heads = "two", window = 16 },
  },
}
