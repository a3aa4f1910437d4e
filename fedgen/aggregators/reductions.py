"""The plain and robust reductions over the client axis as aggregators (math: aggregators.robust).

Each aggregate(updates [C, ...], weights [C], state, key, ctx) returns one tree like a client's
upload; a client with weight 0 never influences it. With every weight 0 the result is 0 (the
algorithm then keeps the global model: see fedgen.fl.engine.aggregate_and_step).

    weighted_mean      sum_k w_k u_k / sum_k w_k                              (FedAvg)
    median, trimmed_mean(beta), norm_bound(bound), multi_krum(f, m), geometric_median(iters, nu)
                       fedgen.aggregators.robust's definitions; they read individual updates
"""
import jax
import jax.numpy as jnp

from fedgen.aggregators import weighting as aggregate
from fedgen.aggregators import robust
from fedgen.aggregators.base import Aggregator

ROBUST = robust.NAMES[1:]


def _no_state(tree):
    del tree
    return ()


def client_drift(updates, mean, weights) -> jax.Array:
    """mean_{k: w_k > 0} ||u_k - u_bar|| / ||u_bar||: how far the clients' updates spread around
    the mean the server applies (the local-epochs vs drift ablation reads it)."""
    sq = sum(
        jnp.sum((u - m[None])**2, axis=tuple(range(1, u.ndim)))
        for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mean)))
    ref = jnp.sqrt(sum(jnp.sum(m**2) for m in jax.tree.leaves(mean)))
    present = (weights > 0).astype(jnp.float32)
    spread = (present * jnp.sqrt(sq)).sum() / jnp.maximum(present.sum(), 1.0)
    return spread / jnp.maximum(ref, 1e-12)


def weighted_mean(drift: bool = False, label: str = 'mean') -> Aggregator:
    """FedAvg's reduction sum_k (w_k / sum_j w_j) u_k; ``drift`` adds the metric client_drift."""

    def agg(updates, weights, state, key, ctx):
        del key, ctx
        mean = aggregate.weighted_mean(updates, weights)
        return mean, state, ({
            'client_drift': client_drift(updates, mean, weights)
        } if drift else {})

    return Aggregator(_no_state, agg, label, diagnostics=('client_drift', ) if drift else ())


def robust_reduction(name: str, label: str = '', *, section: str = '', **hp) -> Aggregator:
    """fedgen.aggregators.robust's ``name`` reduction with hyper-parameters ``hp`` (beta, bound, f,
    m, iters, nu; unused ones ignored). Multi-Krum's [C] selection stays internal.
    section: the caller's prefix for the names in error messages and the default label, e.g.
    'fed.'."""
    if name not in robust.NAMES:
        raise ValueError(f'{section}aggregator must be one of {robust.NAMES}, got {name!r}')
    if name == 'mean':
        return weighted_mean(label=label or f"{section}aggregator='mean'")

    def agg(updates, weights, state, key, ctx):
        del key, ctx
        out, metrics = robust.reduce(name, updates, weights, section=section, **hp)
        return out, state, {k: v for k, v in metrics.items() if k != 'selected'}

    return Aggregator(_no_state, agg, label or f'{section}aggregator={name!r}', individual=True)


def median(**kw) -> Aggregator:
    return robust_reduction('median', **kw)


def trimmed_mean(beta: float, **kw) -> Aggregator:
    return robust_reduction('trimmed_mean', beta=beta, **kw)


def norm_bound(bound: float, **kw) -> Aggregator:
    return robust_reduction('norm_bound', bound=bound, **kw)


def multi_krum(f: int, m: int, **kw) -> Aggregator:
    return robust_reduction('multi_krum', f=f, m=m, **kw)


def geometric_median(iters: int, nu: float, **kw) -> Aggregator:
    return robust_reduction('geometric_median', iters=iters, nu=nu, **kw)
