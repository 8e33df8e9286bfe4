#ifndef REALM_OPTIMIZER_H
#define REALM_OPTIMIZER_H

#include "ir.h"

typedef struct {
    int hyper;               /* input [8]: lr, beta1, beta2, eps, weight_decay, 1-b1^t, 1-b2^t, clip */
    int sumsq;               /* scalar: sum of squared gradients (before clipping) */
    int first_node;          /* first optimizer node */
} ir_optimizer;

/* Parameters per multi-tensor `adamw` node (one launch): 4 inputs and 3 outputs each, within
 * IR_MAX_IO and the kernel argument limit. */
#define ADAMW_GROUP 12

/* Append the optimizer nodes after ir_autodiff. Returns 0 or -1 with g->err. */
int ir_add_optimizer(ir_graph *g, ir_optimizer *o);

#endif
