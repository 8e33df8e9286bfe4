-- expect: 4: syntax
local nn = require "realm.nn"
return nn.model {
  name = "broken" vocab = 256,
}
