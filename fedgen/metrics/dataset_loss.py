"""Dataset-level evaluation of a loss function, exactly weighted.

For batches [NB, B, ...] with per-example weights, the dataset mean is

    L = sum_i mean_i * weight_i / sum_i weight_i

over batches i, where (mean_i, weight_i) = loss_fn(variables, batch_i, rng_i). For the LM loss L is
the mean NLL per predicted token and exp(L) the perplexity.
"""
from typing import Callable

import jax
import jax.numpy as jnp


def dataset_loss(loss_fn: Callable, variables: dict, batches: dict,
                 rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean loss, total weight) over all batches; a lax.map, so jit it from the caller.

    A batch whose weights are all 0 (padding: evaluation sets packed to the largest client's
    batch count) adds nothing to either sum, so it is skipped by a scalar ``lax.cond`` rather than
    computed (under vmap the cond is a select, and both branches run).
    """
    nb = batches['weight'].shape[0]
    keys = jax.random.split(rng, nb)

    def one(xs):
        batch, key = xs
        out = jax.eval_shape(loss_fn, variables, batch, key)
        skip = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
        return jax.lax.cond(batch['weight'].sum() > 0, lambda: loss_fn(variables, batch, key), skip)

    means, weights = jax.lax.map(one, (batches, keys))
    total = weights.sum()
    return (means * weights).sum() / jnp.maximum(total, 1.0), total
