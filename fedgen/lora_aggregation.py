"""Federated LoRA aggregation over the stacked client axis, and its aggregation error.

Layout: module m has A [..., in, r] (fan_in = prod(A.shape[:-1])) and B [r, out]; clients are
stacked [C, ...]; the adapted kernel is W0 + dW + s A B with s = alpha / r (r = the stored rank
r_max, see :mod:`fedgen.lora_ranks`) and dW a server-side frozen delta. With p_k = w_k / sum_j w_j
(w = 0 for absent/padding clients) the clients' mean product is P = sum_k p_k A_k B_k. Averaging A
and B separately gives Abar Bbar, and

    P - Abar Bbar = sum_k p_k (A_k - Abar)(B_k - Bbar)       (the cross term; Abar = sum_k p_k A_k)

so FedAvg of factors is not FedAvg of updates. The aggregation error of a module is
e_m = ||P - Abar Bbar||_F / ||P||_F; over modules we report the pooled ratio
sqrt(sum_m ||.||^2 / sum_m ||P_m||^2) (the relative error of the whole update) and the mean of the
e_m. Norms use ||U V||_F^2 = sum((U^T U) * (V V^T)) over the rank-concatenated factors U [in, m],
V [m, out] (m ~ C r, the [C, C] grid of r x r Gram blocks), or U @ V when in*out <= m (in + out):
never more than one module's [in, out], never [C, in, out].

Methods (``METHODS``); every one returns the next global adapter and the frozen delta dW:
- avg_ab: (Abar, Bbar). FedGen-Edge's rule. With rank masks: HetLoRA's per-slice mean.
- exact_residual (FedEx-LoRA): (Abar, Bbar), and dW += s (P - Abar Bbar), so the global model is
  the exact mean. ``residual_rank`` k adds the rank-k truncated SVD of the residual instead.
- svd_refactor (FlexLoRA): (A, B) = (U_r S_r^1/2, S_r^1/2 V_r^T) from the truncated SVD of P. The
  balanced split keeps ||A|| = ||B|| per direction so both factors keep learning; s is unchanged
  (P and A B are both raw products, so s (A B) approximates s P). Directions with singular value
  <= 1e-6 s_1 keep the previous A column and get B row 0 (a fresh-LoRA slice: trainable, product 0).
- ffa (FFA-LoRA): A frozen at its init; clients train and send B only; B = sum_k p_k B_k is exact.
- stack (FLoRA): A_st = [p_1 A_1 | ... | p_C A_C] [in, C r], B_st = [B_1; ...; B_C], so
  A_st B_st = P exactly; it is folded at the end of the round (the paper's practice),
  dW += s A_st B_st, and the global adapter restarts as a fresh LoRA (A redrawn from ``rng``, or the
  old A without one; B = 0). Absent clients and unowned rank slices are zero columns of a static
  [in, C r_max] buffer.

Bytes per client per round (``upload_bytes``/``download_bytes``, true ranks r_k): (A, B) costs
r_k (fan_in + out) per module (ffa: r_k out, B only); the dW increment costs fan_in out dense, or
k (fan_in + out) with ``residual_rank`` k (exact_residual), or (sum of the round's r_k)
(fan_in + out) as FLoRA's stacked factors (stack). A client that missed rounds needs the whole
accumulated dW: fan_in out.
"""
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedgen import lora_ranks

PyTree = Any

METHODS = ('avg_ab', 'exact_residual', 'svd_refactor', 'ffa', 'stack')
# Methods whose global update is not a pseudo-gradient of (A, B): a server optimizer other than
# sgd(1.0) would break the product they construct.
NO_SERVER_OPT = ('exact_residual', 'svd_refactor', 'stack')
WITH_DELTA = ('exact_residual', 'stack')
# Base algorithms with no aggregated (A, B) for these methods to act on.
NO_AGGREGATION = ('fedavg_full', 'local_only', 'centralized')
_TINY = float(np.finfo(np.float32).tiny)
_DEAD = 1e-6  # relative singular value below which an SVD direction counts as empty


def validate(method: str,
             residual_rank: int | None = None,
             *,
             heterogeneous_ranks: bool = False,
             algorithm: str = 'fedgen_edge',
             server_sgd_lr1: bool = True) -> None:
    """Raises ValueError (one line, naming the config field) for a refused setting.

    Refused: an unknown method; residual_rank <= 0, or given to a method other than exact_residual;
    any method but avg_ab with fedsa (B never leaves the client), fedavg_full, local_only or
    centralized (nothing factored is aggregated); exact_residual / svd_refactor / stack with a
    server optimizer other than sgd(lr=1); exact_residual with heterogeneous ranks (a rank-r_k
    client downloads a truncation of the global adapter, so the residual would not make its model
    the exact mean: use stack or svd_refactor). Heterogeneous ranks are refused with
    fedavg_full, local_only and centralized.
    """
    if method not in METHODS:
        raise ValueError(f'fed.lora_aggregation must be one of {METHODS}, got {method!r}')
    if residual_rank is not None:
        if isinstance(residual_rank, bool) or not isinstance(residual_rank, (int, np.integer)) \
                or residual_rank <= 0:
            raise ValueError(f'fed.residual_rank must be an int >= 1 (None: dense residual), '
                             f'got {residual_rank!r}')
        if method != 'exact_residual':
            raise ValueError(f'fed.residual_rank applies only to fed.lora_aggregation='
                             f"'exact_residual', got {method!r}")
    if method != 'avg_ab' and algorithm in NO_AGGREGATION + ('fedsa', ):
        raise ValueError(f'fed.lora_aggregation={method!r} cannot run with fed.algorithm='
                         f"{algorithm!r}; use 'avg_ab'")
    if heterogeneous_ranks and algorithm in NO_AGGREGATION:
        raise ValueError(f'lora.client_ranks needs per-client adapters; fed.algorithm='
                         f'{algorithm!r} has none')
    if method in NO_SERVER_OPT and not server_sgd_lr1:
        raise ValueError(f'fed.lora_aggregation={method!r} sets the global adapter itself; '
                         "it needs fed.server_opt='sgd' with fed.server_lr=1.0")
    if method == 'exact_residual' and heterogeneous_ranks:
        raise ValueError("fed.lora_aggregation='exact_residual' is refused with lora.client_ranks"
                         " (heterogeneous ranks); use 'stack' or 'svd_refactor'")


@dataclasses.dataclass(frozen=True)
class LoraAggregation:
    """method: one of METHODS; alpha: LoRA alpha (s = alpha / r_max); residual_rank: None or k."""
    method: str = 'avg_ab'
    alpha: float = 16.0
    residual_rank: int | None = None

    def __post_init__(self):
        validate(self.method, self.residual_rank)


class AggError(NamedTuple):
    """per_module {'h_0/attn/q': e_m}; total: pooled sqrt(sum num^2 / sum den^2); mean of e_m."""
    per_module: dict
    total: jax.Array
    mean: jax.Array


class Aggregator(NamedTuple):
    """init(global) -> state; aggregate(state, global, clients, w, rank_mask, rng) ->
    (state, new_global, metrics); download(state, global) -> (start adapters, dW tree);
    upload(client tree) -> the tree a client sends."""
    init: Callable
    aggregate: Callable
    download: Callable
    upload: Callable


def _modules(tree: PyTree) -> list[tuple]:
    return sorted(p[:-1] for p in traverse_util.flatten_dict(tree) if p[-1] == 'a')


def _probs(weights: jax.Array) -> jax.Array:
    w = weights.astype(jnp.float32)
    return w / jnp.maximum(w.sum(), _TINY)


def _wmean(x: jax.Array, p: jax.Array, ref: jax.Array) -> jax.Array:
    """sum_k p_k x_k written as x_ref + sum_k p_k (x_k - x_ref): identical clients give x_ref."""
    r0 = x[ref]
    return r0 + jnp.tensordot(p.astype(x.dtype), x - r0, axes=1)


def _cat(a: jax.Array, b: jax.Array, p: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """[C, fin, r], [C, r, out] -> U [fin, C r] (columns p_k A_k), V [C r, out].

    U V = sum_k p_k A_k B_k (p None: p_k = 1)."""
    c, fin, r = a.shape
    if p is not None:
        a = a * p.astype(a.dtype)[:, None, None]
    return a.transpose(1, 0, 2).reshape(fin, c * r), b.reshape(c * r, b.shape[-1])


def _sq_norm(u: jax.Array, v: jax.Array, mode: str = 'auto') -> jax.Array:
    """||u @ v||_F^2 for u [fin, m], v [m, out], by Gram blocks or by one dense [fin, out]."""
    fin, m = u.shape
    out = v.shape[1]
    if mode == 'dense' or (mode == 'auto' and fin * out <= m * (fin + out)):
        return jnp.sum(jnp.square(u @ v))
    return jnp.maximum(jnp.sum((u.T @ u) * (v @ v.T)), 0.0)


def _residual(a, b, p, ref, abar, bbar) -> tuple[jax.Array, jax.Array]:
    """Factors (U, V) of P - abar bbar for any abar [fin, r], bbar [r, out]:
    sum_k p_k (A_k - abar)(B_k - bbar) + (sum_k p_k A_k - abar) bbar + abar (sum_k p_k B_k - bbar).
    The last two terms vanish when abar, bbar are the plain weighted means (bit for bit)."""
    u, v = _cat(a - abar, b - bbar, p)
    u = jnp.concatenate([u, _wmean(a, p, ref) - abar, abar], axis=1)
    v = jnp.concatenate([v, bbar, _wmean(b, p, ref) - bbar], axis=0)
    return u, v


def _svd(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD (left [fin, k], s [k] descending, right [k, out]) of u @ v, k = min(m, fin, out):
    through QR of both factors when m < min(fin, out), else of the dense [fin, out]."""
    fin, m = u.shape
    out = v.shape[1]
    if m < min(fin, out):
        qu, ru = jnp.linalg.qr(u)
        qv, rv = jnp.linalg.qr(v.T)
        uc, s, vct = jnp.linalg.svd(ru @ rv.T, full_matrices=False)
        return qu @ uc, s, vct @ qv.T
    return jnp.linalg.svd(u @ v, full_matrices=False)


def _means(a, b, p, ref, weights, mask, prev_a, prev_b):
    """(abar, bbar): plain weighted means, or HetLoRA per-slice means when ``mask`` is given."""
    if mask is None:
        return _wmean(a, p, ref), _wmean(b, p, ref)
    m = lora_ranks.sliced_mean({'a': a, 'b': b}, weights, mask, {'a': prev_a, 'b': prev_b})
    return m['a'], m['b']


def _ratio(num2: jax.Array, den2: jax.Array) -> jax.Array:
    return jnp.where(num2 > 0, jnp.sqrt(num2) / jnp.sqrt(jnp.maximum(den2, _TINY)), 0.0)


def _flat(fa: dict, fb: dict, path: tuple) -> tuple[jax.Array, jax.Array]:
    a, b = fa[path + ('a', )], fb[path + ('b', )]
    return a.reshape(a.shape[0], -1, a.shape[-1]), b


def aggregation_error(stacked_a: PyTree,
                      stacked_b: PyTree,
                      weights: jax.Array,
                      rank_mask: jax.Array | None = None,
                      mode: str = 'auto') -> AggError:
    """||P - Abar Bbar||_F / ||P||_F per module, pooled and averaged (see the module docstring).

    stacked_a / stacked_b: trees holding the clients' 'a' [C, ..., in, r] / 'b' [C, r, out] leaves
    (the same stacked adapter tree may be passed twice); weights [C]; rank_mask [C, r] or None
    (with it, adapters are masked and Abar, Bbar are HetLoRA's per-slice means, unowned slices 0).
    mode: 'auto' | 'gram' | 'dense' (how the norms are formed; the value is the same).
    """
    if rank_mask is not None:
        stacked_a = lora_ranks.mask_adapters(stacked_a, rank_mask)
        stacked_b = lora_ranks.mask_adapters(stacked_b, rank_mask)
    fa, fb = traverse_util.flatten_dict(stacked_a), traverse_util.flatten_dict(stacked_b)
    p, ref = _probs(weights), jnp.argmax(weights)
    per, nums, dens = {}, [], []
    for path in _modules(stacked_a):
        a, b = _flat(fa, fb, path)
        zero_a, zero_b = jnp.zeros_like(a[0]), jnp.zeros_like(b[0])
        abar, bbar = _means(a, b, p, ref, weights, rank_mask, zero_a, zero_b)
        num2 = _sq_norm(*_residual(a, b, p, ref, abar, bbar), mode)
        den2 = _sq_norm(*_cat(a, b, p), mode)
        per['/'.join(path)] = _ratio(num2, den2)
        nums.append(num2)
        dens.append(den2)
    total = _ratio(sum(nums), sum(dens))
    return AggError(per, total, jnp.mean(jnp.stack(list(per.values()))))


def has_modules(adapters: PyTree) -> bool:
    """Whether the tree holds at least one adapted module (an 'a' and 'b' pair)."""
    return bool(_modules(adapters))


def client_adapters(global_adapters: PyTree, deltas: PyTree) -> PyTree:
    """The clients' final adapters [C, ...] = global + Delta_k, for the leaves present in deltas."""
    g = traverse_util.flatten_dict(global_adapters)
    return traverse_util.unflatten_dict({
        p: g[p][None] + d
        for p, d in traverse_util.flatten_dict(deltas).items()
    })


def apply_delta(params: PyTree, delta: PyTree) -> PyTree:
    """params with W0 + dW for every 'kernel' leaf of ``delta`` (the effective frozen weights)."""
    flat = dict(traverse_util.flatten_dict(params))
    for path, d in traverse_util.flatten_dict(delta).items():
        if path not in flat:
            raise ValueError(f'frozen delta at {"/".join(path)} has no kernel in params')
        flat[path] = flat[path] + d.astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def trainable_mask(method: str, adapters: PyTree) -> PyTree:
    """Bool tree over ``adapters``: True where the method trains (ffa: 'b' only; others: all).

    For ``optax.masked`` / ``optax.multi_transform`` (so weight decay cannot move a frozen A).
    """
    flat = traverse_util.flatten_dict(adapters)
    return traverse_util.unflatten_dict({p: not (method == 'ffa' and p[-1] == 'a') for p in flat})


def split_trainable(method: str, adapters: PyTree) -> tuple[PyTree, PyTree]:
    """(frozen, trainable) parts of adapters: ffa ({.. 'a'}, {.. 'b'}); other methods ({}, all).

    Differentiate only ``trainable`` and rebuild the model's ``lora`` collection with
    :func:`join_trainable`; dL/dA is then never formed.
    """
    flat, mask = traverse_util.flatten_dict(adapters), traverse_util.flatten_dict(
        trainable_mask(method, adapters))
    return (traverse_util.unflatten_dict({
        p: v
        for p, v in flat.items() if not mask[p]
    }), traverse_util.unflatten_dict({
        p: v
        for p, v in flat.items() if mask[p]
    }))


def join_trainable(frozen: PyTree, trainable: PyTree) -> PyTree:
    """Inverse of :func:`split_trainable` (leaf paths are disjoint)."""
    return traverse_util.unflatten_dict({
        **traverse_util.flatten_dict(frozen),
        **traverse_util.flatten_dict(trainable)
    })


def stack_adapters(stacked: PyTree,
                   weights: jax.Array,
                   rank_mask: jax.Array | None = None) -> PyTree:
    """FLoRA's stacked adapter {module: {'a': [..., in, C r], 'b': [C r, out]}}: A_st B_st = P.

    Client k occupies rank columns [k r, (k + 1) r); absent clients (w_k = 0) and slices beyond
    r_k are zero, so the buffer has the static size C r_max.
    """
    if rank_mask is not None:
        stacked = lora_ranks.mask_adapters(stacked, rank_mask)
    flat, p, out = traverse_util.flatten_dict(stacked), _probs(weights), {}
    for path in _modules(stacked):
        kshape = flat[path + ('a', )].shape[1:-1]
        u, v = _cat(*_flat(flat, flat, path), p)
        out[path + ('a', )] = u.reshape(kshape + (u.shape[-1], ))
        out[path + ('b', )] = v
    return traverse_util.unflatten_dict(out)


def _init_state(method: str, global_adapters: PyTree) -> dict:
    flat, delta = traverse_util.flatten_dict(global_adapters), {}
    if method in WITH_DELTA:
        for path in _modules(global_adapters):
            a, b = flat[path + ('a', )], flat[path + ('b', )]
            delta[path + ('kernel', )] = jnp.zeros(a.shape[:-1] + b.shape[-1:], a.dtype)
    return {'delta': traverse_util.unflatten_dict(delta)}


def make(hp: LoraAggregation) -> Aggregator:
    """The (init, aggregate, download, upload) of ``hp.method``; see the module docstring.

    aggregate(state, global_adapters, clients, weights, rank_mask=None, rng=None):
      clients: the clients' final adapters stacked [C, ...] (``client_adapters``; for ffa the 'b'
      leaves suffice); weights [C] (0 = absent); rank_mask [C, r_max] or None; rng: stack's
      re-drawn A (None keeps the old A). Returns (state, new global, metrics) with metrics
      lora_agg_error (pooled avg_ab error of this round's clients), lora_agg_error_mean and
      lora_update_error (pooled ||P - s^-1 (new global product + dW increment)|| / ||P||: 0 by
      construction for exact_residual (dense) and stack, SVD truncation for svd_refactor and
      residual_rank). With every weight 0 the state and global are returned unchanged.
    """
    method = hp.method

    def upload(tree):
        if method != 'ffa':
            return tree
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] != 'a'})

    def download(state, global_adapters):
        return global_adapters, state['delta']

    def aggregate(state, global_adapters, clients, weights, rank_mask=None, rng=None):
        g, cl = traverse_util.flatten_dict(global_adapters), traverse_util.flatten_dict(clients)
        c = weights.shape[0]
        if method == 'ffa':  # A never moves: every client holds the global A
            cl = {
                **cl,
                **{
                    p: jnp.broadcast_to(v, (c, ) + v.shape)
                    for p, v in g.items() if p[-1] == 'a'
                }
            }
        if rank_mask is not None:
            cl = traverse_util.flatten_dict(
                lora_ranks.mask_adapters(traverse_util.unflatten_dict(cl), rank_mask))
        p, ref = _probs(weights), jnp.argmax(weights)
        present = weights.astype(jnp.float32).sum() > 0
        new, delta = dict(g), dict(traverse_util.flatten_dict(state['delta']))
        nums, dens, upds, errs = [], [], [], []
        for i, path in enumerate(_modules(global_adapters)):
            ga, gb = g[path + ('a', )], g[path + ('b', )]
            kshape, r = ga.shape[:-1], ga.shape[-1]
            a, b = _flat(cl, cl, path)
            abar, bbar = _means(a, b, p, ref, weights, rank_mask, ga.reshape(-1, r), gb)
            num2 = _sq_norm(*_residual(a, b, p, ref, abar, bbar))
            up, vp = _cat(a, b, p)
            den2 = _sq_norm(up, vp)
            upd2, inc = num2, None
            if method == 'ffa':
                abar, bbar = ga.reshape(-1, r), _wmean(b, p, ref)
                upd2 = _sq_norm(*_residual(a, b, p, ref, abar, bbar))
            elif method == 'exact_residual' and hp.residual_rank is None:
                inc, upd2 = jnp.matmul(*_residual(a, b, p, ref, abar, bbar)), 0.0
            elif method == 'exact_residual':
                left, s, right = _svd(*_residual(a, b, p, ref, abar, bbar))
                k = min(hp.residual_rank, s.shape[0])
                inc, upd2 = (left[:, :k] * s[:k]) @ right[:k], jnp.sum(jnp.square(s[k:]))
            elif method == 'svd_refactor':
                left, s, right = _svd(up, vp)
                live = s[:r] > _DEAD * s[0]
                root = jnp.where(live, jnp.sqrt(s[:r]), 0.0)
                abar = jnp.where(live, left[:, :r] * root, ga.reshape(-1, r))
                bbar = root[:, None] * right[:r]
                upd2 = jnp.sum(jnp.square(s)) - jnp.sum(jnp.square(jnp.where(live, s[:r], 0.0)))
                upd2 = jnp.maximum(upd2, 0.0)
            elif method == 'stack':
                inc, upd2 = up @ vp, 0.0
                abar = ga.reshape(-1, r)
                if rng is not None:
                    fan_in = abar.shape[0]
                    abar = jax.random.normal(jax.random.fold_in(rng, i), abar.shape,
                                             abar.dtype) / np.sqrt(fan_in)
                bbar = jnp.zeros_like(gb)
            if inc is not None:
                kp = path + ('kernel', )
                scale = hp.alpha / r
                delta[kp] = jnp.where(present, delta[kp] + scale * inc.reshape(delta[kp].shape),
                                      delta[kp])
            new[path + ('a', )] = jnp.where(present, abar.reshape(kshape + (r, )), ga)
            new[path + ('b', )] = jnp.where(present, bbar, gb)
            nums.append(num2)
            dens.append(den2)
            upds.append(upd2)
            errs.append(_ratio(num2, den2))
        metrics = {
            'lora_agg_error': _ratio(sum(nums), sum(dens)),
            'lora_agg_error_mean': jnp.mean(jnp.stack(errs)),
            'lora_update_error': _ratio(sum(upds), sum(dens)),
        }
        state = {**state, 'delta': traverse_util.unflatten_dict(delta)}
        return state, traverse_util.unflatten_dict(new), metrics

    return Aggregator(lambda global_adapters: _init_state(method, global_adapters), aggregate,
                      download, upload)


def _module_shapes(adapters: PyTree) -> list[tuple[int, int, int]]:
    """(fan_in, out, itemsize) of every module of an unstacked adapter tree."""
    flat = traverse_util.flatten_dict(adapters)
    out = []
    for path in _modules(adapters):
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
    shapes = _module_shapes(adapters)
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
