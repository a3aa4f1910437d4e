"""Bytes per client per round of the LoRA aggregations (aggregators.lora_math), at true ranks.

(A, B) costs r_k (fan_in + out) entries per module (ffa: r_k out, B only); the dW increment costs
fan_in out dense, or k (fan_in + out) with ``residual_rank`` k (exact_residual), or (sum of the
round's r_k)(fan_in + out) as FLoRA's stacked factors (stack). A client that missed rounds needs
the whole accumulated dW: fan_in out. A layer-stacked module counts as its L layers.
"""
from typing import Any

import numpy as np
from flax import traverse_util

from fedgen.lora import ranks as lora_ranks
from fedgen.aggregators.lora_math import WITH_DELTA, module_paths, split_layers, stacked_modules

PyTree = Any


def module_shapes(adapters: PyTree) -> list[tuple[int, int, int]]:
    """(fan_in, out, itemsize) of every module (every layer of a stacked one) of an adapter tree
    without a client axis."""
    adapters = split_layers(adapters, stacked_modules(adapters))
    flat = traverse_util.flatten_dict(adapters)
    out = []
    for path in module_paths(adapters):
        a, b = flat[path + ('a', )], flat[path + ('b', )]
        out.append((int(np.prod(a.shape[:-1])), int(b.shape[-1]), np.dtype(a.dtype).itemsize))
    return out


def upload_bytes(method: str, adapters: PyTree, ranks: np.ndarray) -> np.ndarray:
    """Bytes [C] each client sends: (A, B) at its rank r_k (ffa: B only). adapters: unstacked."""
    return lora_ranks.rank_bytes(adapters, ranks, ('b', ) if method == 'ffa' else ('a', 'b'))


def download_bytes(method: str,
                   adapters: PyTree,
                   ranks: np.ndarray,
                   present: np.ndarray | None = None,
                   residual_rank: int | None = None,
                   round_clients: int | None = None) -> dict[str, np.ndarray]:
    """Bytes [C] each client receives this round, by part.

    adapter: the global (A, B) at r_k (ffa: B only); delta_round: the dW increment as sent (dense
    fan_in out for exact_residual, k (fan_in + out) with residual_rank k, stack: FLoRA's stacked
    factors, (sum of present clients' r_k)(fan_in + out)); delta_dense: the accumulated dW a client
    that missed rounds needs (fan_in out); total = adapter + delta_round.
    ranks: [C] true ranks; present: [C] bool (default all). round_clients: how many clients a
    round stacks when ``ranks`` covers the whole population (N > C): stack then counts
    round(round_clients * mean of the present r_k) stacked rank slices, the expected size.
    delta_round is what a client present in the previous round needs; a client that missed rounds
    needs the sum of the missed increments, at most delta_dense.
    """
    ranks = np.asarray(ranks, np.int64)
    present = np.ones(ranks.shape, bool) if present is None else np.asarray(present, bool)
    shapes = module_shapes(adapters)
    adapter = lora_ranks.rank_bytes(adapters, ranks, ('b', ) if method == 'ffa' else ('a', 'b'))
    dense = sum(fi * fo * n for fi, fo, n in shapes) if method in WITH_DELTA else 0
    if method == 'exact_residual' and residual_rank is not None:
        rnd = sum(residual_rank * (fi + fo) * n for fi, fo, n in shapes)
    elif method == 'stack':
        stacked = int(ranks[present].sum()) if round_clients is None else int(
            round(round_clients * ranks[present].mean()))
        rnd = stacked * sum((fi + fo) * n for fi, fo, n in shapes)
    else:
        rnd = dense
    full = np.full(ranks.shape, rnd, np.int64)
    return {
        'adapter': adapter,
        'delta_round': full,
        'delta_dense': np.full(ranks.shape, dense, np.int64),
        'total': adapter + full
    }
