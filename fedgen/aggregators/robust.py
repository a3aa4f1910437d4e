"""Robust aggregation: pure reductions over the stacked client axis that tolerate bad uploads.

Every leaf of ``stacked`` is [C, ...]; ``w`` [C] is the client weight (n_k), and w_k = 0 means the
client is absent (padding, dropped, non-finite). Absent clients never influence a result: their
values are zeroed (NaN-safe) and pushed past the present ones before any sort, so shapes stay
static and the number present, n = #{k : w_k > 0}, is a traced value. Let P be the present set.

    mean              sum_k w_k x_k / sum_k w_k                               (FedAvg)
    median            per coordinate, the median of {x_k : k in P}             (unweighted)
    trimmed_mean      per coordinate, the mean of {x_k : k in P} after dropping the
                      t = floor(beta * n) smallest and t largest values        (unweighted)
    norm_bound        x_k <- x_k * min(1, tau / ||x_k||), then the weighted mean; tau = bound,
                      or the median of {||x_k|| : k in P} when bound = 0
    multi_krum        d_ij = ||x_i - x_j||^2 over the flattened client vectors; score_i = the sum
                      of the n - f - 2 smallest d_ij, j in P \\ {i}; the weighted mean of the m
                      lowest-scoring present clients (m = 0: n - f; m = 1: Krum)
    geometric_median  smoothed Weiszfeld (RFA): z <- sum_k b_k x_k / sum_k b_k,
                      b_k = w_k / max(nu, ||z - x_k||), ``iters`` times from the weighted mean

Norms and distances are over the client's whole tree. With no client present every reduction
returns zeros (the engine stops such a round before using it). ``reduce`` is the one entry point.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedgen.aggregators import weighting as aggregate

PyTree = Any
NAMES = ('mean', 'median', 'trimmed_mean', 'norm_bound', 'multi_krum', 'geometric_median')
DEFAULTS = dict(beta=0.1, bound=0.0, f=1, m=0, iters=4, nu=1e-6)
_TINY = 1e-30


def finite_mask(stacked: PyTree) -> jax.Array:
    """[C] bool: True where every leaf of the client's tree is finite."""
    per = [jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) for x in jax.tree.leaves(stacked)]
    return jnp.stack(per).all(axis=0)


def _present(w: jax.Array) -> jax.Array:
    return w > 0


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape((v.shape[0], ) + (1, ) * (x.ndim - 1))


def _zero_absent(stacked: PyTree, present: jax.Array) -> PyTree:
    # where(), not a product: an absent client's NaN times 0 is still NaN.
    return jax.tree.map(lambda x: jnp.where(_bcast(present, x), x, jnp.zeros_like(x)), stacked)


def _sorted_present(x: jax.Array, present: jax.Array) -> jax.Array:
    """x [C, ...] sorted along the client axis with absent clients moved to the end (+inf)."""
    filled = jnp.where(_bcast(present, x), x.astype(jnp.float32), jnp.inf)
    return jnp.sort(filled, axis=0)


def _median_sorted(s: jax.Array, n: jax.Array) -> jax.Array:
    """The median of the first n rows of sorted s [C, ...] (mean of the two middles when even)."""
    lo = jnp.clip((n - 1) // 2, 0, s.shape[0] - 1)
    hi = jnp.clip(n // 2, 0, s.shape[0] - 1)
    mid = 0.5 * (s[lo] + s[hi])
    return jnp.where(n > 0, mid, 0.0)


def median(stacked: PyTree, w: jax.Array) -> PyTree:
    present = _present(w)
    n = present.sum()
    return jax.tree.map(lambda x: _median_sorted(_sorted_present(x, present), n).astype(x.dtype),
                        stacked)


def trimmed_mean(stacked: PyTree, w: jax.Array, beta: float) -> tuple[PyTree, jax.Array]:
    """Per-coordinate beta-trimmed mean over present clients; also returns t (trimmed per side)."""
    present = _present(w)
    n = present.sum()
    t = jnp.floor(jnp.asarray(beta, jnp.float32) * n).astype(jnp.int32)

    def one(x):
        s = _sorted_present(x, present)
        rank = jnp.arange(x.shape[0])
        keep = (rank >= t) & (rank < n - t)
        total = jnp.where(_bcast(keep, s), s, 0.0).sum(axis=0)
        return (total / jnp.maximum(n - 2 * t, 1)).astype(x.dtype)

    return jax.tree.map(one, stacked), t


def client_norms(stacked: PyTree) -> jax.Array:
    """[C] L2 norm of each client's whole tree."""
    sq = [
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(stacked)
    ]
    return jnp.sqrt(sum(sq))


def norm_bound(stacked: PyTree, w: jax.Array, bound: float) -> tuple[PyTree, dict]:
    """Clips every update to tau (``bound``, or the median present norm when bound = 0), then
    takes the weighted mean."""
    present = _present(w)
    norms = client_norms(stacked)
    med = _median_sorted(_sorted_present(norms, present), present.sum())
    bound = jnp.asarray(bound, jnp.float32)
    tau = jnp.where(bound > 0, bound, med)
    factor = jnp.minimum(1.0, tau / jnp.maximum(norms, _TINY))
    clipped = jax.tree.map(lambda x: (x * _bcast(factor, x).astype(x.dtype)), stacked)
    frac = ((factor < 1.0) & present).sum() / jnp.maximum(present.sum(), 1)
    return aggregate.weighted_mean(clipped, w), {'clip_bound': tau, 'clipped_frac': frac}


def _sq_distances(stacked: PyTree) -> jax.Array:
    """[C, C] squared distances between the flattened client vectors, from the Gram matrix."""
    gram = sum(
        jnp.einsum('id,jd->ij', v, v, precision=jax.lax.Precision.HIGHEST)
        for v in (x.astype(jnp.float32).reshape(x.shape[0], -1) for x in jax.tree.leaves(stacked)))
    sq = jnp.diag(gram)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def multi_krum(stacked: PyTree, w: jax.Array, f: int, m: int) -> tuple[PyTree, jax.Array]:
    """Multi-Krum; returns the weighted mean of the selected clients and the [C] f32 selection."""
    present = _present(w)
    num = present.shape[0]
    n = present.sum()
    d = _sq_distances(stacked)
    others = present[None, :] & present[:, None] & ~jnp.eye(num, dtype=bool)
    d = jnp.sort(jnp.where(others, d, jnp.inf), axis=1)
    k = jnp.maximum(n - f - 2, 1)  # neighbours counted per score (>= 1 when few are present)
    # A lone present client has no finite neighbour: its score is 0, not inf, so it is selected.
    score = jnp.where((jnp.arange(num)[None, :] < k) & jnp.isfinite(d), d, 0.0).sum(axis=1)
    score = jnp.where(present, score, jnp.inf)
    m_eff = jnp.where(m > 0, m, jnp.maximum(n - f, 1))
    rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
    selected = (rank < m_eff) & present
    sel_w = jnp.where(selected, w, 0.0)
    return aggregate.weighted_mean(stacked, sel_w), selected.astype(jnp.float32)


def geometric_median(stacked: PyTree, w: jax.Array, iters: int, nu: float) -> tuple[PyTree, dict]:
    """Smoothed Weiszfeld iterations (RFA) from the weighted mean, a fixed number of times."""
    alpha = jnp.where(_present(w), w.astype(jnp.float32), 0.0)

    def distances(z):
        sq = [
            jnp.sum(jnp.square((x - zz[None]).astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
            for x, zz in zip(jax.tree.leaves(stacked), jax.tree.leaves(z))
        ]
        return jnp.sqrt(sum(sq))

    def step(_, z):
        beta = alpha / jnp.maximum(jnp.asarray(nu, jnp.float32), distances(z))
        return aggregate.weighted_mean(stacked, beta)

    z = jax.lax.fori_loop(0, iters, step, aggregate.weighted_mean(stacked, alpha))
    obj = (alpha * distances(z)).sum() / jnp.maximum(alpha.sum(), _TINY)
    return z, {'gm_objective': obj}


def reduce(name: str,
           stacked: PyTree,
           w: jax.Array,
           *,
           section: str = '',
           **hp) -> tuple[PyTree, dict]:
    """The ``name`` reduction (static) of stacked [C, ...] with weights w [C] -> (tree, metrics).

    hp: any of beta, bound, f, m, iters, nu (see DEFAULTS); keys the method does not use are
    ignored, so one dict of hyper-parameters serves every name. metrics always holds
    'num_present'; 'multi_krum' adds 'selected' [C].
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ValueError(f'robust.reduce: unknown hyper-parameters {sorted(unknown)}')
    if name not in NAMES:
        raise ValueError(f'{section}aggregator must be one of {NAMES}, got {name!r}')
    hp = {**DEFAULTS, **hp}
    w = jnp.asarray(w, jnp.float32)
    present = _present(w)
    w = jnp.where(present, w, 0.0)
    stacked = _zero_absent(stacked, present)
    metrics = {'num_present': present.sum().astype(jnp.float32)}
    if name == 'mean':
        out = aggregate.weighted_mean(stacked, w)
    elif name == 'median':
        out = median(stacked, w)
    elif name == 'trimmed_mean':
        out, t = trimmed_mean(stacked, w, hp['beta'])
        metrics['trimmed_per_side'] = t.astype(jnp.float32)
    elif name == 'norm_bound':
        out, extra = norm_bound(stacked, w, hp['bound'])
        metrics.update(extra)
    elif name == 'multi_krum':
        out, sel = multi_krum(stacked, w, int(hp['f']), int(hp['m']))
        metrics['selected'] = sel
    else:
        out, extra = geometric_median(stacked, w, int(hp['iters']), hp['nu'])
        metrics.update(extra)
    return out, metrics


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(name: str,
          clients_per_round: int,
          attack_fraction: float = 0.0,
          *,
          section: str = '',
          **hp) -> None:
    """One-line ValueErrors naming the field (aggregator, attack.fraction, robust.*) early.

    clients_per_round is the static C the reduction sees (after over-selection).
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if name not in NAMES:
        raise ValueError(f'{section}aggregator must be one of {NAMES}, got {name!r}')
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ValueError(f'{section}robust has unknown fields {sorted(unknown)}; known: '
                         f'{sorted(DEFAULTS)}')
    hp = {**DEFAULTS, **hp}
    num = lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        and math.isfinite(v))
    if name == 'median' and attack_fraction >= 0.5:
        raise ValueError(f'{section}attack.fraction {attack_fraction} >= 0.5 breaks the median '
                         f'({section}aggregator=median resists fewer than half); '
                         f'use a fraction < 0.5')
    if name == 'trimmed_mean' and not (num(hp['beta']) and 0.0 <= hp['beta'] < 0.5):
        raise ValueError(f'{section}robust.beta must be in [0, 0.5), got {hp["beta"]!r}')
    if name == 'norm_bound' and not (num(hp['bound']) and hp['bound'] >= 0.0):
        raise ValueError(f'{section}robust.bound must be >= 0 (0 = median norm), '
                         f'got {hp["bound"]!r}')
    if name == 'multi_krum':
        f, m = hp['f'], hp['m']
        if not (_int(f) and f >= 0):
            raise ValueError(f'{section}robust.f must be an int >= 0, got {f!r}')
        if not clients_per_round > 2 * f + 2:
            raise ValueError(
                f'{section}robust.f={f} is too large for {clients_per_round} clients per '
                f'round: Multi-Krum needs C > 2f + 2 (f <= {(clients_per_round - 3) // 2})')
        if not (_int(m) and 0 <= m <= clients_per_round - f):
            raise ValueError(f'{section}robust.m must be an int in [0, C - f] = '
                             f'[0, {clients_per_round - f}] (0 = C - f), got {m!r}')
    if name == 'geometric_median':
        if not (_int(hp['iters']) and hp['iters'] >= 1):
            raise ValueError(f'{section}robust.iters must be an int >= 1, got {hp["iters"]!r}')
        if not (num(hp['nu']) and hp['nu'] > 0):
            raise ValueError(f'{section}robust.nu must be > 0, got {hp["nu"]!r}')
