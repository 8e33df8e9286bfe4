/* cuemu: a CPU stand-in for the CUDA backend (development tool; see README.md). reverse: run
 * the threads of a block in reverse order; early: cp.async copies land at issue. */
#ifndef REALM_CUEMU_H
#define REALM_CUEMU_H
#include "backend.h"
backend *cuemu_create(int reverse, int early);
#endif
