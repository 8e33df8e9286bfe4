-- expect: 3: attempt to perform arithmetic on a nil value
local nn = require "realm.nn"
local width = undefined_variable * 2
