"""Reductions over the leading client axis of stacked pytrees (every leaf is [C, ...])."""
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """sum_k (w_k / sum_j w_j) x_k over the client axis; zeros when sum_j w_j = 0.

    stacked: pytree of [C, ...]; weights: [C] (e.g. n_k, 0 for padding clients).
    """
    w = weights.astype(jnp.float32)
    p = w / jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda x: jnp.tensordot(p.astype(x.dtype), x, axes=1), stacked)


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
    """sum_k w_k x_k over the client axis."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def weighted_average_scalar(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k w_k v_k / sum_k w_k for [C] values (0 when every weight is 0)."""
    w = weights.astype(jnp.float32)
    return (values * w).sum() / jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)
