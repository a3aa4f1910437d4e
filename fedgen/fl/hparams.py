"""Traced hyper-parameters of a round: many runs with different values in one compiled program.

A round's ``RoundData.hparams`` is None (the method's compile-time values) or an :class:`HParams`
of float32 scalars, traced like the fate rates, so changing them never recompiles and a vmapped
sweep (fedgen/fl/runs.py) gives every run its own values:

    client step:  w <- w + s_c * u,  u = client_tx.update(g)      (learning rate s_c * lr_c)
    server step:  w_G <- w_G + s_s * u,  u = server_tx.update(-Delta)   (s_s * lr_s)
    client loss:  L_k(w) + (mu / 2) ||w - w_anchor||^2   (mu traced, also when the compiled mu is 0)

Scaling the update equals scaling the learning rate for every optimizer whose update is linear in
it (sgd, momentum, adam, adamw, fedgen.algorithms.optim's choices: each ends in
scale_by_learning_rate); in floating point the two differ by rounding only.

Why not ``optax.inject_hyperparams``: it gives the same numbers (bit-identical for the client
optimizers, within one ulp for the FedOpt server optimizers; tests/test_hparams_inject.py), but it
keeps the learning rate in the optimizer state, so every checkpoint's layout would change with the
sweep, and it needs each factory's argument to be called ``learning_rate``. A multiple carried in
the round's data leaves the optimizer state, and the checkpoints, as they are.
"""
from typing import Any

import jax
import numpy as np
from flax import struct

PyTree = Any


@struct.dataclass
class HParams:
    """client_lr_scale s_c, server_lr_scale s_s (multiples of the compiled learning rates) and
    the proximal weight mu, each a [] float32 (stacked [R] across the runs of a sweep)."""
    client_lr_scale: Any
    server_lr_scale: Any
    prox_mu: Any

    @classmethod
    def of(cls, client_lr_scale: float = 1.0, server_lr_scale: float = 1.0, prox_mu: float = 0.0):
        for field, v in (('client_lr_scale', client_lr_scale), ('server_lr_scale', server_lr_scale),
                         ('prox_mu', prox_mu)):
            if not np.isfinite(v) or v < 0:
                raise ValueError(f'hparams.{field} must be a finite number >= 0, got {v!r}')
        return cls(np.float32(client_lr_scale), np.float32(server_lr_scale), np.float32(prox_mu))


def scale(updates: PyTree, s) -> PyTree:
    """s * u for every leaf (s None: the updates unchanged), in each leaf's dtype."""
    if s is None:
        return updates
    return jax.tree.map(lambda u: (u * s).astype(u.dtype), updates)


def client(hp: HParams | None, proximal: bool = True):
    """The client update's ``hp`` argument: None, or (s_c, mu) (mu None when ``proximal`` is
    False: Ditto's personal step keeps its own lambda)."""
    return None if hp is None else (hp.client_lr_scale, hp.prox_mu if proximal else None)


def server(hp: HParams | None):
    """The server step's learning-rate multiple: None (1), or s_s."""
    return None if hp is None else hp.server_lr_scale
