"""Federated methods. Each module exposes

    variables(backbone, config, rng) -> (frozen, trainable)
    make(config, loss_fn) -> fedavg.Algorithm(init, apply, upload)

and, when it keeps per-client trees in ``ServerState.clients``, ``personal(state)`` -> the stacked
[N, ...] personal trainable trees (Ditto, FedSA, local-only). FedAdam is any federated method with
``fed.server_opt='fedadam'``.
"""
import importlib

METHODS = ('fedgen_edge', 'fedavg_full', 'fedprox', 'ditto', 'fedsa', 'local_only', 'centralized')


def get(name: str):
    """The method module called ``name`` (config field ``fed.algorithm``)."""
    if name not in METHODS:
        raise ValueError(f'fed.algorithm must be one of {list(METHODS)}, got {name!r}')
    return importlib.import_module(f'fedgen.algorithms.{name}')
