-- expect: 2: model file ran too long
while true do end
