-- expect: 3: attempt to index a nil value (global 'io')
local nn = require "realm.nn"
local f = io.open("/etc/passwd")
return nn.model { d_model = 64, blocks = { nn.swiglu { hidden = 8 } } }
