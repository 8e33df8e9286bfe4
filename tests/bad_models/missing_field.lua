-- expect: 4: missing required field 'window'
local nn = require "realm.nn"
return nn.model { d_model = 64,
  blocks = { nn.attention { heads = 2 } },
}
