/* The project's one pseudo-random generator: xoshiro256** (Blackman & Vigna), seeded through
 * splitmix64. The whole state is four words so a checkpoint can save and restore it exactly,
 * and a resumed run draws the same corpus windows as an uninterrupted one. Header-only: the
 * functions are a few instructions each and sit in the trainer's sampling loop. */
#ifndef REALM_RNG_H
#define REALM_RNG_H

#include <stdint.h>

typedef struct { uint64_t s[4]; } rng_state;

static inline uint64_t rng_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* splitmix64 step: the seeder recommended for xoshiro, because it spreads any 64-bit seed
 * (0, 1, 2, ...) over all 256 bits and can never produce the all-zero state. */
static inline uint64_t rng_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline void rng_seed(rng_state *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = rng_splitmix64(&seed);
}

static inline uint64_t rng_next(rng_state *r) {
    uint64_t *s = r->s;
    uint64_t out = rng_rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rng_rotl(s[3], 45);
    return out;
}

/* Uniform in [0, n), unbiased for every n up to 2^64-1 (n = 0 returns 0). Plain `x % n`
 * favours small results whenever n does not divide 2^64 - badly so for n near 2^63, which
 * a 64 GiB corpus is nowhere near, but offsets must be exact anyway. Draws below
 * 2^64 mod n are rejected so that the accepted range is a whole number of periods of n;
 * at most half of all draws are rejected, typically almost none. */
static inline uint64_t rng_below(rng_state *r, uint64_t n) {
    if (n == 0) return 0;
    uint64_t threshold = (0 - n) % n;   /* == 2^64 mod n */
    for (;;) {
        uint64_t x = rng_next(r);
        if (x >= threshold) return x % n;
    }
}

/* Uniform double in [0, 1) with 53 random bits. */
static inline double rng_uniform(rng_state *r) {
    return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

#endif
