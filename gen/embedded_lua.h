/* The Lua block library (the .lua files of models/lib), embedded at build time. */
#ifndef REALM_EMBEDDED_LUA_H
#define REALM_EMBEDDED_LUA_H
#include <stddef.h>
typedef struct {
    const char *module;      /* "realm.nn" */
    const char *path;        /* "models/lib/nn.lua", used as the chunk name */
    const char *src;
    size_t len;
} lualib_file;
extern const lualib_file realm_lualib[];   /* terminated by a zero entry */
#endif
