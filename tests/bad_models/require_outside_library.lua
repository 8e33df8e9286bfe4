-- expect: 2: module 'os' not found
local os = require "os"
