/* On-disk cache of compiled kernels (CUBINs, OpenCL program binaries).
 *
 * An entry is one file <dir>/<hex sha256 of the key>.kc holding a fixed header
 *   magic "REALMKC1" | u32 format version | u32 reserved (0) | u64 payload length |
 *   sha256(payload) [32 bytes]                  (integers little-endian; 56 bytes in all)
 * followed by the payload. Writers go through a temp file in the same directory, fsync it
 * and rename it over the entry, so a reader sees either a whole old entry or a whole new one;
 * readers verify length and checksum, so a damaged or truncated entry reads as a miss and the
 * caller rebuilds and overwrites it.
 *
 * The key is a sha256 over length-prefixed parts (source, options, device, driver versions,
 * KCACHE_FORMAT_VERSION), so two different part lists can never collide by concatenation.
 */
#ifndef REALM_KCACHE_H
#define REALM_KCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "sha256.h"

/* Bump when the payload layout or the meaning of a key changes: old entries become misses. */
#define KCACHE_FORMAT_VERSION 1u

/* Resolve the cache directory: override if non-NULL and non-empty, else $REALM_CACHE_DIR,
 * else $XDG_CACHE_HOME/realm, else $HOME/.cache/realm; create it (and parents). Returns 0
 * and fills dir, or -1 with the reason in err. Returns 1 (dir = "") when the cache is
 * disabled by `disable` or REALM_NO_CACHE=1 in the environment. */
int kcache_dir(const char *override, int disable, char *dir, size_t dirlen, char *err, size_t errlen);

/* Key building: init, add parts, finish. */
typedef struct kcache_key { sha256_ctx ctx; } kcache_key;
void kcache_key_init(kcache_key *k, const char *domain);    /* domain e.g. "cuda-cubin" */
void kcache_key_add(kcache_key *k, const void *data, size_t n);
void kcache_key_str(kcache_key *k, const char *s);           /* NULL adds a distinct "null" part */
void kcache_key_final(kcache_key *k, uint8_t key[32]);

typedef enum { KC_MISS = 0, KC_HIT = 1, KC_BAD = 2 } kcache_status;

/* Look up key in dir. KC_HIT: *data (malloc'd, caller frees) and *len are set. KC_MISS: no
 * entry. KC_BAD: an entry exists but is damaged (why in err); treat as a miss. */
kcache_status kcache_get(const char *dir, const uint8_t key[32], void **data, size_t *len,
                         char *err, size_t errlen);
/* Store payload under key (atomically replacing any entry). 0, or -1 with the reason. */
int kcache_put(const char *dir, const uint8_t key[32], const void *data, size_t len,
               char *err, size_t errlen);
/* The entry's path (for tests and diagnostics). */
void kcache_path(const char *dir, const uint8_t key[32], char *path, size_t pathlen);

#endif
