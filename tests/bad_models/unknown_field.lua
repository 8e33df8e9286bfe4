-- expect: 3: nn.mamba3: unknown field 'dstate'
local nn = require "realm.nn"
local m = nn.mamba3 { dstate = 16 }
return nn.model { d_model = 64, blocks = { m } }
