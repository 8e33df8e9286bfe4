-- tiny: the same block kinds as realm-9m at a size a CPU trains in minutes (tests, demos).
local nn = require "realm.nn"
return nn.model {
  name = "tiny", vocab = 256, d_model = 64,
  blocks = nn.repeat_pattern("MMA", 1, {
    M = nn.mamba3 { d_state = 16, headdim = 32, expand = 2, chunk = 16 },
    A = nn.attention { heads = 2, window = 64 },
  }),
  mlp = nn.swiglu { hidden = 128 },
  train = { lr = 3e-3, warmup = 50, schedule = "cosine", weight_decay = 0.1, batch = 16, seq = 128,
            steps = 1000, eval_every = 100, save_every = 100 },
}
