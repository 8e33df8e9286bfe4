-- A model with a block written in the model file itself (docs/models.md walks through it).
local nn = require "realm.nn"

local gated = nn.block { kind = "gated", build = function(g, x, ctx)
  local d = g:dim(x)
  local h = nn.linear(g, x, 2 * d, "up")                       -- [B, S, 2d]
  local a, b = g:split(h, {d, d})                              -- two zero-copy views
  local gate = g:rmsnorm(b, g:param("gate", {d}, "ones"))      -- a learned per-channel gain
  return nn.linear(g, a * g:silu(gate), d, "down", ctx.resid_std)
end }

return nn.model {
  name = "gated-example", d_model = 64,
  blocks = { nn.mamba3 { d_state = 16, headdim = 32, chunk = 16 }, gated,
             nn.attention { heads = 2, window = 32 } },
  train = { batch = 8, seq = 64 },
}
