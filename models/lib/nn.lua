-- realm.nn: the block library. Every block is written here in Lua from graph primitives
-- (g:matmul, g:rmsnorm, g:mamba3_scan, ...); a model file can define its own blocks the
-- same way (see docs/models.md). Sizes are checked where a block is declared, so an error
-- points at the line of the model file that caused it.
local nn = {}

-- "file:line" of the model-file line that is running: where a block is being declared.
local function caller() return model_location() end

local function fail(where, msg) error(where .. ": " .. msg, 0) end

local function is_int(v) return math.type(v) == "integer" or (type(v) == "number" and v == math.floor(v) and v == v) end

-- cfg[key] must be a positive integer (or absent when a default is given).
local function size(cfg, key, where, default)
  local v = cfg[key]
  if v == nil then
    if default ~= nil then return default end
    fail(where, "missing required field '" .. key .. "'")
  end
  if type(v) ~= "number" then fail(where, "'" .. key .. "' must be a number, got " .. type(v)) end
  if not is_int(v) then fail(where, "'" .. key .. "' must be an integer, got " .. tostring(v)) end
  if v <= 0 then fail(where, "'" .. key .. "' must be positive, got " .. tostring(v)) end
  return math.tointeger(v)
end

local function number(cfg, key, where, default, lo)
  local v = cfg[key]
  if v == nil then return default end
  if type(v) ~= "number" then fail(where, "'" .. key .. "' must be a number, got " .. type(v)) end
  if lo and not (v > lo) then fail(where, "'" .. key .. "' must be greater than " .. lo) end
  return v
end

local function check_fields(cfg, where, allowed, what)
  if type(cfg) ~= "table" then fail(where, what .. " expects a table of fields") end
  for k in pairs(cfg) do
    if not allowed[k] then fail(where, what .. ": unknown field '" .. tostring(k) .. "'") end
  end
end

local function set(...) local s = {} for _, k in ipairs({...}) do s[k] = true end return s end

-- A linear layer without bias: x [..., d_in] -> [..., n]; weight [n, d_in] named NAME.weight.
function nn.linear(g, x, n, name, std)
  local w = g:param(name .. ".weight", {n, g:dim(x)}, {"normal", std or 0.02})
  return g:matmul(x, w)
end

function nn.rmsnorm(g, x, name, eps)
  local w = g:param(name .. ".weight", {g:dim(x)}, "ones")
  return g:rmsnorm(x, w, {eps = eps or 1e-5})
end

-- Mamba-3 SISO mixer (design.md §7): trapezoid discretisation, data-dependent A, complex
-- (rotary) state on B/C with NA = N * rope_fraction / 2 angles, BC RMSNorm with per-head
-- biases, D skip, silu(z) gate, no short convolution.
function nn.mamba3(cfg)
  local where = caller()
  check_fields(cfg, where, set("d_state", "headdim", "expand", "chunk", "rope_fraction",
    "dt_min", "dt_max", "dt_floor", "recompute"), "nn.mamba3")
  local c = {
    N = size(cfg, "d_state", where, 64),
    P = size(cfg, "headdim", where, 64),
    expand = size(cfg, "expand", where, 2),
    chunk = size(cfg, "chunk", where, 64),
    rope_fraction = number(cfg, "rope_fraction", where, 0.5, 0),
    dt_min = number(cfg, "dt_min", where, 1e-3, 0),
    dt_max = number(cfg, "dt_max", where, 1e-1, 0),
    dt_floor = number(cfg, "dt_floor", where, 1e-4),
  }
  if c.rope_fraction > 1 then fail(where, "'rope_fraction' must be in (0, 1]") end
  local na = c.N * c.rope_fraction / 2
  if not is_int(na) or na < 1 then
    fail(where, "d_state * rope_fraction / 2 must be a positive integer (the number of rotation angles)")
  end
  c.NA = math.tointeger(na)
  return {
    kind = "mamba3", where = where, recompute = cfg.recompute == true,
    build = function(g, x, ctx)
      local d = g:dim(x)
      local di = c.expand * d
      if di % c.P ~= 0 then
        fail(where, ("expand * d_model (%d) is not divisible by headdim (%d)"):format(di, c.P))
      end
      local H, N, NA = di // c.P, c.N, c.NA
      local proj = nn.linear(g, x, 2 * di + 2 * N + 3 * H + NA, "in_proj")
      local z, xv, Bm, Cm, dd_dt, dd_A, trap, ang = g:split(proj, {di, di, N, N, H, H, H, NA})
      xv = g:reshape(xv, {H, c.P})
      local Bn = nn.rmsnorm(g, Bm, "B_norm")
      local Cn = nn.rmsnorm(g, Cm, "C_norm")
      local dt_bias = g:param("dt_bias", {H}, {"dt_bias", c.dt_min, c.dt_max, c.dt_floor})
      local B_bias = g:param("B_bias", {H, N}, "ones")
      local C_bias = g:param("C_bias", {H, N}, "ones")
      local D = g:param("D", {H}, "ones")
      local y
      if g.mode == "step" then
        -- Decode: one token per sequence through the recurrence, carrying (S, Theta, Kr, v)
        -- in state tensors that the step updates in place (docs/decode.md).
        local S = g:state("ssm", {H, c.P, N})
        local Th = g:state("theta", {H, NA})
        local Kr = g:state("k_prev", {H, N})
        local vp = g:state("v_prev", {H, c.P})
        local S2, Th2, Kr2, vp2
        y, S2, Th2, Kr2, vp2 = g:mamba3_step(xv, Bn, Cn, dd_dt, dd_A, trap, ang, dt_bias, B_bias, C_bias, D,
                                             S, Th, Kr, vp)
        g:assign(S, S2); g:assign(Th, Th2); g:assign(Kr, Kr2); g:assign(vp, vp2)
      elseif g.mode == "prefill" then
        -- Prefill: the chunked scan from the carried state (zeros for a new prompt, the end of
        -- the previous turn in a chat), handing the step graph the state at the end of the
        -- prompt (its length is a multiple of the chunk, so the last chunk's saved state is h_T).
        local S = g:state("ssm", {H, c.P, N})
        local Th = g:state("theta", {H, NA})
        local Kr = g:state("k_prev", {H, N})
        local vp = g:state("v_prev", {H, c.P})
        local saved
        y, saved = g:mamba3_scan(xv, Bn, Cn, dd_dt, dd_A, trap, ang, dt_bias, B_bias, C_bias, D,
                                 S, Th, Kr, vp, {chunk = c.chunk})
        local S2, Th2, Kr2, vp2 = g:mamba3_final(saved, xv, Bn, dd_dt, ang, dt_bias, B_bias, Th,
                                                 {chunk = c.chunk})
        g:assign(S, S2); g:assign(Th, Th2); g:assign(Kr, Kr2); g:assign(vp, vp2)
      else
        y = g:mamba3_scan(xv, Bn, Cn, dd_dt, dd_A, trap, ang, dt_bias, B_bias, C_bias, D,
                          {chunk = c.chunk})
      end
      y = g:reshape(y, {di}) * g:silu(z)
      return nn.linear(g, y, d, "out_proj", ctx.resid_std)
    end,
  }
end

-- Sliding-window causal attention with RoPE on q and k; grouped KV heads optional.
function nn.attention(cfg)
  local where = caller()
  check_fields(cfg, where, set("heads", "kv_heads", "head_dim", "window", "rope_base", "recompute"),
    "nn.attention")
  local c = {
    heads = size(cfg, "heads", where),
    window = size(cfg, "window", where),
    rope_base = number(cfg, "rope_base", where, 10000, 1),
  }
  c.kv_heads = size(cfg, "kv_heads", where, c.heads)
  if c.heads % c.kv_heads ~= 0 then
    fail(where, ("heads (%d) must be a multiple of kv_heads (%d)"):format(c.heads, c.kv_heads))
  end
  if cfg.head_dim ~= nil then c.head_dim = size(cfg, "head_dim", where) end
  if c.head_dim and c.head_dim % 2 ~= 0 then fail(where, "'head_dim' must be even (RoPE pairs)") end
  return {
    kind = "attention", where = where, recompute = cfg.recompute == true,
    build = function(g, x, ctx)
      local d = g:dim(x)
      local Dh = c.head_dim
      if not Dh then
        if d % c.heads ~= 0 then
          fail(where, ("d_model (%d) is not divisible by heads (%d)"):format(d, c.heads))
        end
        Dh = d // c.heads
        if Dh % 2 ~= 0 then fail(where, "head dim d_model/heads must be even (RoPE pairs)") end
      end
      local H, Hkv = c.heads, c.kv_heads
      local qkv = nn.linear(g, x, (H + 2 * Hkv) * Dh, "qkv")
      local q, k, v = g:split(qkv, {H * Dh, Hkv * Dh, Hkv * Dh})
      local o
      if g.mode == "step" then
        -- Decode: RoPE at each sequence's absolute position, k and v written into ring buffers
        -- of the last `window` tokens (slot = position % window), the query attends over the
        -- ring with the same causal window as the parallel form.
        local pos = ctx.positions
        q = g:rope_at(g:reshape(q, {H, Dh}), pos, {base = c.rope_base})
        k = g:rope_at(g:reshape(k, {Hkv, Dh}), pos, {base = c.rope_base})
        v = g:reshape(v, {Hkv, Dh})
        local Kc = g:state("k_cache", {c.window, Hkv, Dh})
        local Vc = g:state("v_cache", {c.window, Hkv, Dh})
        local K2, V2 = g:ring_write(Kc, k, pos), g:ring_write(Vc, v, pos)
        g:assign(Kc, K2); g:assign(Vc, V2)
        o = g:attention_ring(q, K2, V2, pos)
      elseif g.mode == "prefill" then
        -- Prefill: the parallel attention over the prompt at its absolute positions, merged with
        -- the previous turns' keys still in the rings (the first window-1 queries see them),
        -- then the rings updated with the prompt's last keys and values.
        local pos = ctx.positions
        q = g:rope_at(g:reshape(q, {H, Dh}), pos, {base = c.rope_base})
        k = g:rope_at(g:reshape(k, {Hkv, Dh}), pos, {base = c.rope_base})
        v = g:reshape(v, {Hkv, Dh})
        local Kc = g:state("k_cache", {c.window, Hkv, Dh})
        local Vc = g:state("v_cache", {c.window, Hkv, Dh})
        local o_in, lse = g:attention(q, k, v, {window = c.window})
        o = g:attention_prefix(o_in, lse, q, Kc, Vc, pos)
        g:assign(Kc, g:ring_fill(k, Kc, pos)); g:assign(Vc, g:ring_fill(v, Vc, pos))
      else
        q = g:rope(g:reshape(q, {H, Dh}), {base = c.rope_base})
        k = g:rope(g:reshape(k, {Hkv, Dh}), {base = c.rope_base})
        v = g:reshape(v, {Hkv, Dh})
        o = g:attention(q, k, v, {window = c.window})
      end
      return nn.linear(g, g:reshape(o, {H * Dh}), d, "o_proj", ctx.resid_std)
    end,
  }
end

-- SwiGLU MLP: W_out (silu(a) * b) with [a | b] = W_in x.
function nn.swiglu(cfg)
  local where = caller()
  check_fields(cfg, where, set("hidden", "recompute"), "nn.swiglu")
  local hidden = size(cfg, "hidden", where)
  return {
    kind = "swiglu", where = where, recompute = cfg.recompute == true,
    build = function(g, x, ctx)
      local h = nn.linear(g, x, 2 * hidden, "w_in")
      local a, b = g:split(h, {hidden, hidden})
      return nn.linear(g, g:silu(a) * b, g:dim(x), "w_out", ctx.resid_std)
    end,
  }
end

-- A user-defined block: nn.block { kind = "name", build = function(g, x, ctx) ... end }.
-- A bare function(g, x, ctx) is accepted wherever a block is.
function nn.block(cfg)
  local where = caller()
  if type(cfg) ~= "table" or type(cfg.build) ~= "function" then
    fail(where, "nn.block needs a build function")
  end
  return {kind = cfg.kind or "block", where = where, build = cfg.build, recompute = cfg.recompute == true}
end

local function as_block(b, where, what)
  if type(b) == "function" then return {kind = "block", where = where, build = b} end
  if type(b) ~= "table" or type(b.build) ~= "function" then
    fail(where, what .. " is not a block (use nn.mamba3, nn.attention, nn.swiglu or nn.block)")
  end
  return b
end

-- repeat_pattern("MMMA", 2, {M = ..., A = ...}) -> the blocks M M M A M M M A
function nn.repeat_pattern(pattern, times, blocks)
  local where = caller()
  if type(pattern) ~= "string" or #pattern == 0 then fail(where, "pattern must be a non-empty string") end
  if not is_int(times) or times < 1 then fail(where, "repeat count must be a positive integer") end
  if type(blocks) ~= "table" then fail(where, "repeat_pattern needs a table of blocks") end
  local out = {}
  for _ = 1, times do
    for ch in pattern:gmatch(".") do
      local b = blocks[ch]
      if b == nil then fail(where, "pattern letter '" .. ch .. "' has no block") end
      out[#out + 1] = as_block(b, where, "block '" .. ch .. "'")
    end
  end
  return out
end

-- The model: embedding, pre-norm residual blocks (each mixer followed by the MLP when one is
-- given), final RMSNorm, LM head (tied to the embedding unless tie_embeddings = false).
function nn.model(cfg)
  local where = caller()
  check_fields(cfg, where, set("name", "vocab", "d_model", "blocks", "mlp", "tie_embeddings", "norm_eps",
    "train", "init_std"), "nn.model")
  local vocab = size(cfg, "vocab", where, 256)
  local d = size(cfg, "d_model", where)
  local eps = number(cfg, "norm_eps", where, 1e-5, 0)
  local std = number(cfg, "init_std", where, 0.02, 0)
  if cfg.name ~= nil and type(cfg.name) ~= "string" then fail(where, "'name' must be a string") end
  if type(cfg.blocks) ~= "table" or #cfg.blocks == 0 then
    fail(where, "'blocks' must be a non-empty list of blocks")
  end
  local blocks = {}
  for i, b in ipairs(cfg.blocks) do blocks[i] = as_block(b, where, "blocks[" .. i .. "]") end
  local mlp = cfg.mlp ~= nil and as_block(cfg.mlp, where, "'mlp'") or nil
  local tie = cfg.tie_embeddings ~= false
  local train = cfg.train or {}
  if type(train) ~= "table" then fail(where, "'train' must be a table") end
  check_fields(train, where, set("lr", "min_lr_frac", "warmup", "schedule", "weight_decay", "beta1", "beta2",
    "eps", "grad_clip", "steps", "batch", "seq", "eval_every", "save_every"), "train")
  for _, k in ipairs({"warmup", "steps", "batch", "seq", "eval_every", "save_every"}) do
    if train[k] ~= nil and train[k] ~= 0 then size(train, k, where) end
  end
  for _, k in ipairs({"lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "min_lr_frac"}) do
    number(train, k, where)
  end
  if train.schedule ~= nil and train.schedule ~= "cosine" and train.schedule ~= "wsd"
     and train.schedule ~= "constant" then
    fail(where, "train.schedule must be \"cosine\", \"wsd\" or \"constant\"")
  end
  local n_layers = #blocks
  local ctx = {d_model = d, n_layers = n_layers, resid_std = std / math.sqrt(2 * n_layers)}
  return {
    name = cfg.name or "model", vocab = vocab, d_model = d, n_layers = n_layers, train = train,
    -- positions: [B,S] absolute positions, given in step and prefill modes
    forward = function(g, tokens, positions)
      ctx.positions = positions
      local emb, x = g:scope("embed", "embedding", function()
        local e = g:param("weight", {vocab, d}, {"normal", std})
        return e, g:embedding(tokens, e)
      end)
      for i, b in ipairs(blocks) do
        x = g:scope("layers." .. (i - 1), b.kind, function()
          g:origin(b.where)
          local h = g:scope("mixer", b.kind, function()
            if b.recompute then g:recompute() end
            return b.build(g, nn.rmsnorm(g, x, "norm", eps), ctx)
          end)
          x = x + h
          if mlp then
            g:origin(mlp.where)
            local m = g:scope("mlp", mlp.kind, function()
              if mlp.recompute then g:recompute() end
              return mlp.build(g, nn.rmsnorm(g, x, "norm", eps), ctx)
            end)
            x = x + m
          end
          g:origin("")
          return x
        end)
      end
      x = g:scope("final_norm", "norm", function() return nn.rmsnorm(g, x, "norm", eps) end)
      return g:scope("head", "head", function()
        if tie then return g:matmul(x, emb) end
        return nn.linear(g, x, vocab, "lm_head", std)
      end)
    end,
  }
end

return nn
