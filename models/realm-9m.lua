-- realm-9m: the 9.67M-parameter byte-level Jamba-style hybrid. Two repeats of three Mamba-3
-- layers and one sliding-window attention layer, a SwiGLU MLP after every mixer, tied head.
local nn = require "realm.nn"
return nn.model {
  name = "realm-9m", vocab = 256, d_model = 384,
  blocks = nn.repeat_pattern("MMMA", 2, {
    M = nn.mamba3 { d_state = 64, headdim = 64, expand = 2 },
    A = nn.attention { heads = 6, window = 1024 },
  }),
  mlp = nn.swiglu { hidden = 288 },
  train = { lr = 3e-3, warmup = 200, schedule = "cosine", weight_decay = 0.1, batch = 16, seq = 1024 },
}
