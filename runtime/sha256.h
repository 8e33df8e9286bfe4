/* SHA-256 (FIPS 180-4). Used for corpus manifests, checkpoint checksums and kernel-cache keys,
 * so it must be exact and dependency-free; speed is secondary (a few hundred MB/s). */
#ifndef REALM_SHA256_H
#define REALM_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];        /* chaining value */
    uint64_t nbytes;      /* message length so far; the padding needs it in bits (< 2^64) */
    uint8_t buf[64];      /* partial block */
    size_t nbuf;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t len);
void sha256_final(sha256_ctx *c, uint8_t out[32]);
void sha256(const void *data, size_t len, uint8_t out[32]);
/* Lower-case hex, NUL-terminated. */
void sha256_hex(const uint8_t in[32], char out[65]);

#endif
