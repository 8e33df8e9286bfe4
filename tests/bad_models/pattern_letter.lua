-- expect: 4: pattern letter 'X' has no block
local nn = require "realm.nn"
return nn.model { d_model = 64,
  blocks = nn.repeat_pattern("MX", 1, { M = nn.mamba3 {} }),
}
