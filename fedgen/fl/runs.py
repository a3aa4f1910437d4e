"""Many federated runs as one program: stack R runs on a leading run axis and vmap the round.

R runs of one method that share every shape and every compile-time setting (model, LoRA rank,
clients per round C, local steps S, optimizers) and differ only in values the round traces (the
seed: client sampling, batch order, adapter init and the state's rng; the round data's packed
clients, fate rates and hyper-parameters, RoundData.rates / .hparams) run as

    states', metrics = vmap(apply, in_axes=(0, None, 0))(states, frozen, data)

states: ServerState with every leaf [R, ...]; frozen: the backbone, broadcast (in_axes None: one
copy in the program, never stacked or copied per run); data: RoundData stacked per run,
client_ids [R, C], batches field -> [R, C, S, B, ...], mask [R, C, S], n_k [R, C];
metrics: every leaf [R, ...]. Run r of the result equals ``apply(states[r], frozen, data[r])``.
"""
from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
    """R trees of the same structure and leaf shapes -> one tree with every leaf [R, ...] (host
    numpy). A structure or shape that differs between runs is a one-line ValueError naming it."""
    if not trees:
        raise ValueError('stack needs at least one tree')
    first, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    for r, tree in enumerate(trees[1:], 1):
        leaves, other = jax.tree_util.tree_flatten_with_path(tree)
        if other != treedef:
            raise ValueError(f'run {r} has another tree structure than run 0: {other} vs {treedef}')
        for (path, a), (_, b) in zip(first, leaves):
            if np.shape(a) != np.shape(b) or np.result_type(a) != np.result_type(b):
                raise ValueError(f'run {r} differs from run 0 at {jax.tree_util.keystr(path)}: '
                                 f'{np.shape(b)} {np.result_type(b)} vs {np.shape(a)} '
                                 f'{np.result_type(a)} (runs of one vmapped group share shapes)')
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take(tree: PyTree, r: int) -> PyTree:
    """Run r's slice of a stacked tree: every leaf [R, ...] -> [...]."""
    return jax.tree.map(lambda x: x[r], tree)


def vmap_round(apply: Callable) -> Callable:
    """apply(state, frozen, data) -> (state, metrics) over a leading run axis of ``state`` and
    ``data`` (see the module docstring); ``frozen`` is shared by every run."""
    return jax.vmap(apply, in_axes=(0, None, 0))


def same_tree(a: PyTree, b: PyTree) -> bool:
    """Whether two trees have the same structure and bitwise-equal leaves (host comparison)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(
        np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))
