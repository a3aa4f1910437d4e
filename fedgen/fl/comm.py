"""Exact communication cost, from the trees actually sent.

Per round with C participating clients:
    uplink   = C * bytes(upload(Delta_k))     what one client sends (e.g. Delta A_k for FedSA)
    downlink = C * bytes(download(w_G))       what the server broadcasts to one client
Bytes are counted from leaf shapes and dtypes (no compression, no headers). Both views come from
the method's :class:`~fedgen.fl.algorithm.Algorithm`, evaluated on abstract shapes (nothing runs). A
round's bytes (``round_bytes``) count the clients that actually took part: every sampled client
downloads, only those whose upload arrived (not dropped) count for the uplink.
"""
from typing import Any, NamedTuple

import jax
import numpy as np

from fedgen.fl.algorithm import Algorithm

PyTree = Any


def num_params(tree: PyTree) -> int:
    """Total number of scalar entries in a pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def num_bytes(tree: PyTree) -> int:
    """Total bytes of a pytree's leaves, from their shapes and dtypes."""
    return int(sum(
        np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class RoundCost(NamedTuple):
    up_per_client: int
    down_per_client: int
    up_round: int
    down_round: int


def round_cost(alg: Algorithm, trainable: PyTree, num_clients: int) -> RoundCost:
    """Cost of one round with ``num_clients`` participating clients."""
    up = num_bytes(jax.eval_shape(alg.upload, trainable))
    down = num_bytes(jax.eval_shape(alg.download, trainable))
    return RoundCost(up, down, up * num_clients, down * num_clients)


def accumulate(totals: dict, cost: RoundCost) -> dict:
    """Running totals {'up_bytes', 'down_bytes'} after one more round."""
    return {
        'up_bytes': totals.get('up_bytes', 0) + cost.up_round,
        'down_bytes': totals.get('down_bytes', 0) + cost.down_round
    }


def round_bytes(up_per_client, down_per_client, ids, sampled, reported) -> tuple[int, int]:
    """(uplink, downlink) bytes of one round, exact integers: every sampled client downloads,
    only the clients whose upload arrived count for the uplink.

    up_per_client / down_per_client: a number (every client alike) or [N] per client id (true
    ranks, SecAgg payloads); ids, sampled, reported: [C] for the round's padded client axis."""
    ids = np.asarray(ids)
    s, r = np.asarray(sampled) > 0, np.asarray(reported) > 0
    return int(_per_id(up_per_client, ids[r]).sum()), int(_per_id(down_per_client, ids[s]).sum())


def _per_id(per_client, ids: np.ndarray) -> np.ndarray:
    """The bytes of each client in ``ids``: a number for all, or an [N] array indexed by id."""
    per_client = np.asarray(per_client, np.int64)
    return per_client[ids] if per_client.ndim else np.full(ids.shape, per_client)
