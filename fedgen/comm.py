"""Exact communication cost, from the trees actually sent.

Per round with C participating clients:
    uplink   = C * bytes(upload(Delta_k))     (what one client sends, e.g. Delta A_k)
    downlink = C * bytes(broadcast tree)      (the global trainable tree w_G)
Bytes are counted from leaf shapes and dtypes (no compression, no headers).
"""
from typing import Any, Callable, NamedTuple

import jax

from fedgen import lora

PyTree = Any


class RoundCost(NamedTuple):
    up_per_client: int
    down_per_client: int
    up_round: int
    down_round: int


def round_cost(upload: Callable, trainable: PyTree, num_clients: int) -> RoundCost:
    """Cost of one round; ``upload(delta)`` is the algorithm's view of what a client sends."""
    sent = jax.eval_shape(upload, trainable)
    up, down = lora.num_bytes(sent), lora.num_bytes(trainable)
    return RoundCost(up, down, up * num_clients, down * num_clients)


def accumulate(totals: dict, cost: RoundCost) -> dict:
    """Running totals {'up_bytes', 'down_bytes'} after one more round."""
    return {
        'up_bytes': totals.get('up_bytes', 0) + cost.up_round,
        'down_bytes': totals.get('down_bytes', 0) + cost.down_round
    }
