-- realm-150m: the realm-9m design at ~150M parameters, for filling a large card (the auto-tuner
-- and recomputation are measured on it). Six repeats of three Mamba-3 layers and one
-- sliding-window attention layer (24 layers), a SwiGLU MLP after every mixer, tied head.
local nn = require "realm.nn"
return nn.model {
  name = "realm-150m", vocab = 256, d_model = 768,
  blocks = nn.repeat_pattern("MMMA", 6, {
    M = nn.mamba3 { d_state = 64, headdim = 64, expand = 2 },
    A = nn.attention { heads = 12, window = 1024 },
  }),
  mlp = nn.swiglu { hidden = 1216 },
  train = { lr = 1.5e-3, warmup = 1000, schedule = "cosine", weight_decay = 0.1, batch = 32, seq = 2048 },
}
