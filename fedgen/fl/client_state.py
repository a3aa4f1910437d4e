"""Per-client persistent trees kept by the server state, stacked [N, ...] over all N clients.

Ditto (personal adapters), FedSA (local B blocks) and local-only training keep one tree per client
in ``ServerState.clients``. A round reads the sampled clients' rows and writes their updates back:

    v[ids] <- v[ids] + delta        (scatter-add)

Adding the delta (rather than setting rows) keeps padding clients harmless: they carry id 0 with a
zero delta (all their steps are masked no-ops), so a real client 0 in the same round is not
overwritten by a duplicate index.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any


def tile(tree: PyTree, n: int) -> PyTree:
    """n stacked copies: every leaf [...] -> [n, ...]."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, ) + jnp.shape(x)), tree)


def gather(clients: PyTree, ids: jax.Array) -> PyTree:
    """Rows ``ids`` [C] of the stacked [N, ...] trees -> [C, ...]."""
    return jax.tree.map(lambda x: x[ids], clients)


def scatter_add(clients: PyTree, ids: jax.Array, delta: PyTree) -> PyTree:
    """clients[ids] += delta for delta [C, ...]; rows not in ``ids`` are unchanged."""
    return jax.tree.map(lambda x, d: x.at[ids].add(d.astype(x.dtype)), clients, delta)


def split(tree: PyTree, local_leaves: set[str]) -> tuple[PyTree, PyTree]:
    """(shared, local): leaves whose last key is in ``local_leaves`` (e.g. {'b'}) go to local."""
    flat = traverse_util.flatten_dict(tree)
    shared = {p: v for p, v in flat.items() if p[-1] not in local_leaves}
    local = {p: v for p, v in flat.items() if p[-1] in local_leaves}
    return traverse_util.unflatten_dict(shared), traverse_util.unflatten_dict(local)


def join(a: PyTree, b: PyTree) -> PyTree:
    """The union of two trees with disjoint leaf paths (inverse of :func:`split`)."""
    flat = dict(traverse_util.flatten_dict(a))
    flat.update(traverse_util.flatten_dict(b))
    return traverse_util.unflatten_dict(flat)
