"""Federated LoRA aggregation over the stacked client axis, and its aggregation error.

Layout: module m has A [..., in, r] (fan_in = prod(A.shape[:-1])) and B [r, out]; clients are
stacked [C, ...]; the adapted kernel is W0 + dW + s A B with s = alpha / r (r = the stored rank
r_max, see :mod:`fedgen.lora.ranks`) and dW a server-side frozen delta. With p_k = w_k / sum_j w_j
(w = 0 for absent/padding clients) the clients' mean product is P = sum_k p_k A_k B_k. Averaging A
and B separately gives Abar Bbar, and

    P - Abar Bbar = sum_k p_k (A_k - Abar)(B_k - Bbar)       (the cross term; Abar = sum_k p_k A_k)

so FedAvg of factors is not FedAvg of updates. The aggregation error of a module is
e_m = ||P - Abar Bbar||_F / ||P||_F; over modules we report the pooled ratio
sqrt(sum_m ||.||^2 / sum_m ||P_m||^2) (the relative error of the whole update) and the mean of the
e_m. Norms use ||U V||_F^2 = sum((U^T U) * (V V^T)) over the rank-concatenated factors U [in, m],
V [m, out] (m ~ C r, the [C, C] grid of r x r Gram blocks), or U @ V when in*out <= m (in + out):
never more than one module's [in, out], never [C, in, out].

Methods (``METHODS``), each a rule of fedgen/aggregators/lora_rules.py:
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

A layer-stacked module (A [L, in, r], B [L, r, out]: the scanned decoder blocks) is L modules;
:func:`split_layers` / :func:`merge_layers` convert. Bytes on the wire: fedgen/lora/bytes.py.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedgen.lora import ranks as lora_ranks

PyTree = Any

METHODS = ('avg_ab', 'exact_residual', 'svd_refactor', 'ffa', 'stack')
# Methods whose global update is not a pseudo-gradient of (A, B): a server optimizer other than
# sgd(1.0) would break the product they construct.
NO_SERVER_OPT = ('exact_residual', 'svd_refactor', 'stack')
WITH_DELTA = ('exact_residual', 'stack')
TINY = float(np.finfo(np.float32).tiny)
DEAD = 1e-6  # relative singular value below which an SVD direction counts as empty


def validate(method: str, residual_rank: int | None = None, *, section: str = '') -> None:
    """Raises ValueError (one line, naming the field: lora_aggregation, residual_rank) for an
    unknown method, or a residual_rank <= 0 or given to a method other than exact_residual. Which
    methods, optimizers, ranks and reductions each aggregation runs with is decided where the
    pieces meet (fedgen.aggregators.lora and fedgen.algorithms.check_combination).
    section: the caller's prefix for the names in error messages, e.g. 'fed.'."""
    if method not in METHODS:
        raise ValueError(f'{section}lora_aggregation must be one of {METHODS}, got {method!r}')
    if residual_rank is not None:
        if isinstance(residual_rank, bool) or not isinstance(residual_rank, (int, np.integer)) \
                or residual_rank <= 0:
            raise ValueError(f'{section}residual_rank must be an int >= 1 (None: dense residual), '
                             f'got {residual_rank!r}')
        if method != 'exact_residual':
            raise ValueError(f'{section}residual_rank applies only to {section}lora_aggregation='
                             f"'exact_residual', got {method!r}")


class AggError(NamedTuple):
    """per_module {'h_0/attn/q': e_m}; total: pooled sqrt(sum num^2 / sum den^2); mean of e_m."""
    per_module: dict
    total: jax.Array
    mean: jax.Array


def module_paths(tree: PyTree) -> list[tuple]:
    return sorted(p[:-1] for p in traverse_util.flatten_dict(tree) if p[-1] == 'a')


def stacked_modules(adapters: PyTree, lead: int = 0) -> frozenset:
    """Paths of layer-stacked modules (B [lead..., L, r, out]: the scanned blocks' adapters)."""
    flat = traverse_util.flatten_dict(adapters)
    return frozenset(p[:-1] for p, v in flat.items() if p[-1] == 'b' and len(v.shape) - lead == 3)


def _take(v, i: int, axis: int):
    if isinstance(v, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(v.shape[:axis] + v.shape[axis + 1:], v.dtype)
    return jnp.take(v, i, axis=axis)


def split_layers(tree: PyTree, modules: frozenset, lead: int = 0) -> PyTree:
    """Every leaf under a layer-stacked module path m (axis ``lead`` is the layer axis L) as L
    modules m + ('layer{i}',): the aggregators then see one [in, r] x [r, out] pair per layer."""
    if not modules:
        return tree
    out = {}
    for p, v in traverse_util.flatten_dict(tree).items():
        if p[:-1] in modules:
            for i in range(v.shape[lead]):
                out[p[:-1] + (f'layer{i}', p[-1])] = _take(v, i, lead)
        else:
            out[p] = v
    return traverse_util.unflatten_dict(out)


def merge_layers(tree: PyTree, modules: frozenset, lead: int = 0) -> PyTree:
    """Inverse of :func:`split_layers`."""
    if not modules:
        return tree
    out, parts = {}, {}
    for p, v in traverse_util.flatten_dict(tree).items():
        if len(p) >= 2 and p[:-2] in modules and p[-2].startswith('layer'):
            parts.setdefault(p[:-2] + (p[-1], ), {})[int(p[-2][5:])] = v
        else:
            out[p] = v
    for p, layers in parts.items():
        out[p] = jnp.stack([layers[i] for i in range(len(layers))], axis=lead)
    return traverse_util.unflatten_dict(out)


def probabilities(weights: jax.Array) -> jax.Array:
    w = weights.astype(jnp.float32)
    return w / jnp.maximum(w.sum(), TINY)


def anchored_mean(x: jax.Array, p: jax.Array, ref: jax.Array) -> jax.Array:
    """sum_k p_k x_k written as x_ref + sum_k p_k (x_k - x_ref): identical clients give x_ref."""
    r0 = x[ref]
    return r0 + jnp.tensordot(p.astype(x.dtype), x - r0, axes=1)


def stack_factors(a: jax.Array,
                  b: jax.Array,
                  p: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """[C, fin, r], [C, r, out] -> U [fin, C r] (columns p_k A_k), V [C r, out].

    U V = sum_k p_k A_k B_k (p None: p_k = 1)."""
    c, fin, r = a.shape
    if p is not None:
        a = a * p.astype(a.dtype)[:, None, None]
    return a.transpose(1, 0, 2).reshape(fin, c * r), b.reshape(c * r, b.shape[-1])


def product_sq_norm(u: jax.Array, v: jax.Array, mode: str = 'auto') -> jax.Array:
    """||u @ v||_F^2 for u [fin, m], v [m, out], by Gram blocks or by one dense [fin, out]."""
    fin, m = u.shape
    out = v.shape[1]
    if mode == 'dense' or (mode == 'auto' and fin * out <= m * (fin + out)):
        return jnp.sum(jnp.square(u @ v))
    return jnp.maximum(jnp.sum((u.T @ u) * (v @ v.T)), 0.0)


def residual_factors(a, b, p, ref, abar, bbar) -> tuple[jax.Array, jax.Array]:
    """Factors (U, V) of P - abar bbar for any abar [fin, r], bbar [r, out]:
    sum_k p_k (A_k - abar)(B_k - bbar) + (sum_k p_k A_k - abar) bbar + abar (sum_k p_k B_k - bbar).
    The last two terms vanish when abar, bbar are the plain weighted means (bit for bit)."""
    u, v = stack_factors(a - abar, b - bbar, p)
    u = jnp.concatenate([u, anchored_mean(a, p, ref) - abar, abar], axis=1)
    v = jnp.concatenate([v, bbar, anchored_mean(b, p, ref) - bbar], axis=0)
    return u, v


def product_svd(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
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


def factor_means(a, b, p, ref, weights, mask, prev_a, prev_b):
    """(abar, bbar): plain weighted means, or HetLoRA per-slice means when ``mask`` is given."""
    if mask is None:
        return anchored_mean(a, p, ref), anchored_mean(b, p, ref)
    m = lora_ranks.sliced_mean({'a': a, 'b': b}, weights, mask, {'a': prev_a, 'b': prev_b})
    return m['a'], m['b']


def norm_ratio(num2: jax.Array, den2: jax.Array) -> jax.Array:
    return jnp.where(num2 > 0, jnp.sqrt(num2) / jnp.sqrt(jnp.maximum(den2, TINY)), 0.0)


def module_factors(fa: dict, fb: dict, path: tuple) -> tuple[jax.Array, jax.Array]:
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
    layered = stacked_modules(stacked_b, 1)
    stacked_a = split_layers(stacked_a, layered, 1)
    stacked_b = split_layers(stacked_b, layered, 1)
    fa, fb = traverse_util.flatten_dict(stacked_a), traverse_util.flatten_dict(stacked_b)
    p, ref = probabilities(weights), jnp.argmax(weights)
    per, nums, dens = {}, [], []
    for path in module_paths(stacked_a):
        a, b = module_factors(fa, fb, path)
        zero_a, zero_b = jnp.zeros_like(a[0]), jnp.zeros_like(b[0])
        abar, bbar = factor_means(a, b, p, ref, weights, rank_mask, zero_a, zero_b)
        num2 = product_sq_norm(*residual_factors(a, b, p, ref, abar, bbar), mode)
        den2 = product_sq_norm(*stack_factors(a, b, p), mode)
        per['/'.join(path)] = norm_ratio(num2, den2)
        nums.append(num2)
        dens.append(den2)
    total = norm_ratio(sum(nums), sum(dens))
    return AggError(per, total, jnp.mean(jnp.stack(list(per.values()))))


def has_modules(adapters: PyTree) -> bool:
    """Whether the tree holds at least one adapted module (an 'a' and 'b' pair)."""
    return bool(module_paths(adapters))


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
    flat, p, out = traverse_util.flatten_dict(stacked), probabilities(weights), {}
    for path in module_paths(stacked):
        kshape = flat[path + ('a', )].shape[1:-1]
        u, v = stack_factors(*module_factors(flat, flat, path), p)
        out[path + ('a', )] = u.reshape(kshape + (u.shape[-1], ))
        out[path + ('b', )] = v
    return traverse_util.unflatten_dict(out)
