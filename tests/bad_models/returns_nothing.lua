-- expect: 1: the model file must return a model
local x = 1
