-- expect: 2: the model file must return a model
local x = 1
