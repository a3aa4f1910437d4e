"""FedProx (Li et al. 2020): FedAvg whose clients minimise L_k(w) + (mu / 2) ||w - w_G^t||^2.

The proximal term lives in :func:`fedgen.client.make_local_update` (anchor = the broadcast w_G^t),
so the local gradient is grad L_k(w) + mu (w - w_G^t). ``fed.prox_target`` picks what is trainable
and regularised: 'lora' (the adapters over the frozen backbone, default) or 'full' (every backbone
weight, as full-model FedAvg). ``fed.prox_mu`` must be > 0.
"""
import jax

from fedgen.algorithms import fedavg, fedavg_full, fedgen_edge

TARGETS = ('lora', 'full')


def _check(config) -> str:
    mu = config.fed.prox_mu
    if not (isinstance(mu, (int, float)) and mu > 0):
        raise ValueError(f'fed.prox_mu must be a number > 0 for fedprox, got {mu!r}')
    target = config.fed.get('prox_target', 'lora')
    if target not in TARGETS:
        raise ValueError(f'fed.prox_target must be one of {TARGETS}, got {target!r}')
    return target


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """Adapters over the frozen backbone ('lora') or the whole backbone trainable ('full')."""
    module = fedgen_edge if _check(config) == 'lora' else fedavg_full
    return module.variables(backbone, config, rng)


def make(config, loss_fn) -> fedavg.Algorithm:
    _check(config)
    return fedgen_edge.make(config, loss_fn)  # passes fed.prox_mu to the client update
