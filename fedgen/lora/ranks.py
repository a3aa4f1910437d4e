"""Heterogeneous client LoRA ranks in one compiled program: a mask on the rank axis.

Every client's adapter is stored at the program's rank r_max (A [..., in, r_max], B [r_max, out], or
B [L, r_max, out] for a layer-stacked module, see :mod:`fedgen.lora.adapters`);
client k owns the first r_k <= r_max rank slices. Its rank mask m_k [r_max], m_kj = 1[j < r_k],
zeros the columns of A and the rows of B beyond r_k:

    A_k <- A_k diag(m_k),        B_k <- diag(m_k) B_k.

Applied *inside* the loss, dL/dA[:, j] = m_kj (...) and dL/dB[j] = m_kj (...) are exactly 0 for
j >= r_k, so those slots never move, and one vmapped program with static shapes serves every rank:
ranks are values in a [C, r_max] mask, never shapes, so nothing recompiles when they change.

Scale. The layer scales by alpha / r_max (the stored rank, :mod:`fedgen.models.layers`), and we keep
that single scale for every client. Client k therefore computes W0 + (alpha / r_max) A_k B_k, which
is exactly a rank-r_k LoRA whose alpha is alpha_k = alpha r_k / r_max. One shared scale keeps the
client products A_k B_k in the same units, so the aggregators may average them; the alternative
(alpha / r_k per client) would give rank-2 clients r_max / 2 times the effective step of rank-r_max
clients under SGD, and would make the stored factors of different clients mean different things.

HetLoRA zero-padding aggregation weights each rank slice by the clients that own it:

    q_kj = w_k m_kj / sum_i w_i m_ij,  A_G[:, j] = sum_k q_kj A_k[:, j],  B_G[j] = sum_k q_kj B_k[j]

and a slice no participating client owns keeps its previous global value. FlexLoRA's download is
the rank-r_k truncation of an SVD-ordered global factorization
(:func:`fedgen.aggregators.lora_math.make` with 'svd_refactor'): that is the global masked by
m_k, so the
in-loss mask alone implements it.

Bytes: a client of rank r_k sends and receives r_k (fan_in + out) entries of (A, B) per module
(fan_in = prod(A.shape[:-1]), e.g. kh*kw*in for a convolution), not r_max (fan_in + out).
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any

# Stream id of the rank draws, so they never share a generator with data sampling.
_RANK_STREAM = 0x72616E6B
DISTRIBUTIONS = ('cycle', 'uniform')


def _parse(spec: str | Sequence[int], section: str = '') -> tuple[str, list]:
    if isinstance(spec, str):
        kind, _, body = spec.partition(':') if ':' in spec else ('cycle', '', spec)
        kind = kind.strip()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f'{section}client_ranks: unknown distribution {kind!r}; use a list '
                             f'of ranks or one of {DISTRIBUTIONS} as "uniform:2,4,8"')
        try:
            ranks = [int(x) for x in body.split(',') if x.strip()]
        except ValueError:
            raise ValueError(f'{section}client_ranks must list integer ranks, '
                             f'got {spec!r}') from None
        return kind, ranks
    return 'cycle', list(spec)


def client_ranks(spec: str | Sequence[int],
                 num_clients: int,
                 r_max: int,
                 seed: int,
                 *,
                 section: str = '') -> np.ndarray:
    """r_k for clients 0..N-1 as int32 [N].

    spec: a list of ranks cycled over client ids ([2, 4, 8] -> 2, 4, 8, 2, ...), the same as a
    string 'cycle:2,4,8' or '2,4,8', or 'uniform:2,4,8' (each client draws one of the listed ranks
    uniformly, from np.random.default_rng([seed, stream])). Raises ValueError naming
    ``client_ranks`` for an empty list, a non-integer, a rank < 1 or a rank > r_max (named
    ``rank``), and ``num_clients`` (unprefixed) for num_clients < 1.
    section: the caller's prefix for client_ranks and rank in error messages, e.g. 'lora.'.
    """
    kind, ranks = _parse(spec, section)
    if not ranks:
        raise ValueError(f'{section}client_ranks must list at least one rank, got {spec!r}')
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= r_max:
            raise ValueError(f'{section}client_ranks: every rank must be an int in '
                             f'[1, {section}rank={r_max}], got {r!r}')
    if num_clients < 1:
        raise ValueError(f'num_clients must be >= 1, got {num_clients}')
    if kind == 'cycle':
        return np.resize(np.asarray(ranks, np.int32), num_clients)
    rng = np.random.default_rng([seed, _RANK_STREAM])
    return rng.choice(np.asarray(ranks, np.int32), size=num_clients)


def rank_mask(ranks: jax.Array, r_max: int) -> jax.Array:
    """m [..., r_max] float32 with m[..., j] = 1[j < r_k]; ranks [...] (e.g. [C]); traceable."""
    return (jnp.arange(r_max) < jnp.asarray(ranks)[..., None]).astype(jnp.float32)


def _mask_leaf(name: str, x: jax.Array, mask: jax.Array) -> jax.Array:
    lead = mask.ndim - 1  # leading (client) axes shared by the mask and the leaf
    m = mask.astype(x.dtype)
    if name == 'a':  # [lead..., ..., in, r]: broadcast over the kernel axes
        return x * m.reshape(m.shape[:-1] + (1, ) * (x.ndim - lead - 1) + m.shape[-1:])
    # 'b': [lead..., r, out] or, layer-stacked, [lead..., L, r, out]
    return x * m.reshape(m.shape[:-1] + (1, ) * (x.ndim - lead - 2) + m.shape[-1:] + (1, ))


def mask_adapters(adapters: PyTree, mask: jax.Array) -> PyTree:
    """Zeros the columns of every A and the rows of every B beyond each client's rank.

    adapters: a tree with leaves named 'a' ([K..., ..., in, r]) and 'b' ([K..., r, out] or
    [K..., L, r, out]); other leaves pass through. mask: [K..., r] where K... are the adapters'
    leading client axes: [C, r]
    for a stacked tree, [r] for one client's tree. Used inside the loss, the masked slots get
    exactly zero gradient (the product with a 0 mask is a constant 0 in them).
    """
    flat = traverse_util.flatten_dict(adapters)
    return traverse_util.unflatten_dict({
        p: _mask_leaf(p[-1], v, mask) if p[-1] in ('a', 'b') else v
        for p, v in flat.items()
    })


def slice_weights(weights: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HetLoRA's per-slice weights q [C, r] (columns sum to 1 where owned) and owned [r] (bool).

    weights: [C] aggregation weights (0 = absent); mask: [C, r] rank mask.
    """
    wm = weights.astype(jnp.float32)[:, None] * mask
    tot = wm.sum(0)
    return wm / jnp.maximum(tot, jnp.finfo(jnp.float32).tiny), tot > 0


def sliced_mean(stacked: PyTree,
                weights: jax.Array,
                mask: jax.Array,
                previous: PyTree | None = None) -> PyTree:
    """HetLoRA zero-padding mean of stacked adapters, slice j weighted by the clients owning it.

    stacked: leaves 'a' [C, ..., in, r], 'b' [C, r, out] or [C, L, r, out]; previous: the global
    tree (no client axis), whose value a slice keeps when no participating client owns it (None:
    zeros). The mean is taken
    as ref + sum_k q_kj (x_k - ref) with ref the heaviest client, so owners identical to it give
    their common value bit for bit.
    """
    q, owned = slice_weights(weights, mask)
    ref = jnp.argmax(weights)
    flat = traverse_util.flatten_dict(stacked)
    prev = traverse_util.flatten_dict(previous) if previous is not None else {}
    out = {}
    for p, x in flat.items():
        if p[-1] not in ('a', 'b'):
            continue
        qq = q.astype(x.dtype)
        r0 = x[ref]
        if p[-1] == 'a':  # contract clients, per rank slice (last axis)
            mean = r0 + jnp.einsum('k...r,kr->...r', x - r0, qq)
            out[p] = jnp.where(owned, mean, prev[p] if prev else 0.0)
        else:
            mean = r0 + jnp.einsum('k...ro,kr->...ro', x - r0, qq)
            out[p] = jnp.where(owned[:, None], mean, prev[p] if prev else 0.0)
    return traverse_util.unflatten_dict(out)


def rank_bytes(adapters: PyTree, ranks: np.ndarray,
               leaves: Sequence[str] = ('a', 'b')) -> np.ndarray:
    """Bytes [C] of the named leaves of each client's adapter at its true rank r_k.

    adapters: one (unstacked) adapter tree at r_max, arrays or ShapeDtypeStructs; ranks: [C].
    A leaf of shape s at rank r_max costs prod(s) / r_max entries per unit of rank.
    """
    ranks = np.asarray(ranks, np.int64)
    per_rank = 0
    for p, x in traverse_util.flatten_dict(adapters).items():
        if p[-1] not in leaves:
            continue
        r_max = x.shape[-1] if p[-1] == 'a' else x.shape[-2]
        per_rank += int(np.prod(x.shape)) // r_max * np.dtype(x.dtype).itemsize
    return ranks * per_rank


def adapter_rank(adapters: PyTree, *, section: str = '') -> int:
    """r_max: the (common) rank axis size of an unstacked adapter tree.

    section: the caller's prefix for the names in error messages, e.g. 'lora.'.
    """
    ranks = {v.shape[-1] for p, v in traverse_util.flatten_dict(adapters).items() if p[-1] == 'a'}
    if len(ranks) != 1:
        raise ValueError(f'{section}rank: adapters must share one rank axis size, '
                         f'got {sorted(ranks)}')
    return ranks.pop()
