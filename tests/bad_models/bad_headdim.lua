-- expect: 5: expand * d_model (96) is not divisible by headdim (64)
local nn = require "realm.nn"
return nn.model {
  d_model = 48,
  blocks = { nn.mamba3 { headdim = 64 } },
}
