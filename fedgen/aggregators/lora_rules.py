"""The LoRA aggregation rules, one small function per method, applied to every adapted module.

A rule maps one module's stacked client factors to the next global factors and the frozen-delta
increment (fedgen.aggregators.lora_math holds the shared math and its notation):

    avg_ab          (Abar, Bbar)                                    FedGen-Edge's FedAvg of factors
    ffa             (A_G, mean B)                                   FFA-LoRA: exact, A frozen
    exact_residual  (Abar, Bbar), dW += s (P - Abar Bbar)           FedEx-LoRA (rank-k: its SVD)
    svd_refactor    balanced rank-r SVD of P                        FlexLoRA
    stack           fresh (A, 0), dW += s A_st B_st = s P           FLoRA, folded every round

:func:`make` builds (init, aggregate, download, upload) over a whole adapter tree, with
heterogeneous-rank masks and layer-stacked modules (split into their L layers and merged back).
"""
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedgen.aggregators import lora_math as la
from fedgen.lora import ranks as lora_ranks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoraAggregation:
    """method: one of la.METHODS; alpha: LoRA alpha (s = alpha / r_max); residual_rank: k or
    None."""
    method: str = 'avg_ab'
    alpha: float = 16.0
    residual_rank: int | None = None

    def __post_init__(self):
        la.validate(self.method, self.residual_rank)


class RuleAggregator(NamedTuple):
    """init(global) -> state; aggregate(state, global, clients, w, rank_mask, rng) ->
    (state, new_global, metrics); download(state, global) -> (start adapters, dW tree);
    upload(client tree) -> the tree a client sends."""
    init: Callable
    aggregate: Callable
    download: Callable
    upload: Callable


def init_state(method: str, global_adapters: PyTree) -> dict:
    flat, delta = traverse_util.flatten_dict(global_adapters), {}
    if method in la.WITH_DELTA:
        for path in la.module_paths(global_adapters):
            a, b = flat[path + ('a', )], flat[path + ('b', )]
            delta[path + ('kernel', )] = jnp.zeros(a.shape[:-1] + b.shape[-1:], a.dtype)
    return {'delta': traverse_util.unflatten_dict(delta)}


class Rule(NamedTuple):
    """One module's aggregation: (abar, bbar, inc, upd2) = rule(a, b, p, ref, abar, bbar, ga, gb,
    hp, key), where a [C, fin, r], b [C, r, out] are the clients' factors, (abar, bbar) the
    (HetLoRA) means, (ga, gb) the previous global factors, inc the dW increment before the
    scale s (None: no dW) and upd2 ||P - (new product + inc)||^2 (the update error)."""
    fn: Callable


def _avg_ab(a, b, p, ref, abar, bbar, ga, gb, hp, key):
    return abar, bbar, None, la.product_sq_norm(*la.residual_factors(a, b, p, ref, abar, bbar))


def _ffa(a, b, p, ref, abar, bbar, ga, gb, hp, key):
    """FFA-LoRA: A never moves, B is the plain mean (exact, since every A_k = A_G)."""
    bbar = la.anchored_mean(b, p, ref)
    return ga, bbar, None, la.product_sq_norm(*la.residual_factors(a, b, p, ref, ga, bbar))


def _fedex(a, b, p, ref, abar, bbar, ga, gb, hp, key):
    """FedEx-LoRA: dW += the residual P - Abar Bbar (dense, or its rank-k truncated SVD)."""
    if hp.residual_rank is None:
        return abar, bbar, jnp.matmul(*la.residual_factors(a, b, p, ref, abar, bbar)), 0.0
    left, s, right = la.product_svd(*la.residual_factors(a, b, p, ref, abar, bbar))
    k = min(hp.residual_rank, s.shape[0])
    return abar, bbar, (left[:, :k] * s[:k]) @ right[:k], jnp.sum(jnp.square(s[k:]))


def _flexlora(a, b, p, ref, abar, bbar, ga, gb, hp, key):
    """FlexLoRA: the balanced rank-r truncated SVD of P; empty directions keep A, get B = 0."""
    r = ga.shape[-1]
    left, s, right = la.product_svd(*la.stack_factors(a, b, p))
    live = s[:r] > la.DEAD * s[0]
    root = jnp.where(live, jnp.sqrt(s[:r]), 0.0)
    abar = jnp.where(live, left[:, :r] * root, ga)
    upd2 = jnp.sum(jnp.square(s)) - jnp.sum(jnp.square(jnp.where(live, s[:r], 0.0)))
    return abar, root[:, None] * right[:r], None, jnp.maximum(upd2, 0.0)


def _flora(a, b, p, ref, abar, bbar, ga, gb, hp, key):
    """FLoRA: the stack folds into dW; the adapter restarts (A redrawn from key, or kept; B = 0)."""
    u, v = la.stack_factors(a, b, p)
    new_a = ga if key is None else jax.random.normal(key, ga.shape, ga.dtype) / np.sqrt(ga.shape[0])
    return new_a, jnp.zeros_like(gb), u @ v, 0.0


RULES = {
    'avg_ab': Rule(_avg_ab),
    'ffa': Rule(_ffa),
    'exact_residual': Rule(_fedex),
    'svd_refactor': Rule(_flexlora),
    'stack': Rule(_flora),
}


def make(hp: LoraAggregation) -> RuleAggregator:
    """The (init, aggregate, download, upload) of ``hp.method`` (its :data:`RULES` entry applied
    to every module; see the module docstring).

    aggregate(state, global_adapters, clients, weights, rank_mask=None, rng=None):
      clients: the clients' final adapters stacked [C, ...] (``client_adapters``; for ffa the 'b'
      leaves suffice); weights [C] (0 = absent); rank_mask [C, r_max] or None; rng: stack's
      re-drawn A (None keeps the old A). Returns (state, new global, metrics) with metrics
      lora_agg_error (pooled avg_ab error of this round's clients), lora_agg_error_mean and
      lora_update_error (pooled ||P - s^-1 (new global product + dW increment)|| / ||P||: 0 by
      construction for exact_residual (dense) and stack, SVD truncation for svd_refactor and
      residual_rank). With every weight 0 the state and global are returned unchanged.
    """
    method, rule = hp.method, RULES[hp.method].fn

    def upload(tree):
        if method != 'ffa':
            return tree
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] != 'a'})

    def download(state, global_adapters):
        return global_adapters, state['delta']

    def aggregate(state, global_adapters, clients, weights, rank_mask=None, rng=None):
        if method == 'ffa':  # A never moves: every client holds the global A
            c = weights.shape[0]
            g = traverse_util.flatten_dict(global_adapters)
            clients = traverse_util.unflatten_dict({
                **traverse_util.flatten_dict(clients),
                **{
                    p: jnp.broadcast_to(v, (c, ) + v.shape)
                    for p, v in g.items() if p[-1] == 'a'
                }
            })
        if rank_mask is not None:
            clients = lora_ranks.mask_adapters(clients, rank_mask)
        layered = la.stacked_modules(global_adapters)
        if not layered:
            return aggregate_modules(state, global_adapters, clients, weights, rank_mask, rng)
        split = {'delta': la.split_layers(state['delta'], layered)}
        split, new, metrics = aggregate_modules(split, la.split_layers(global_adapters, layered),
                                                la.split_layers(clients, layered, 1), weights,
                                                rank_mask, rng)
        state = {**state, 'delta': la.merge_layers(split['delta'], layered)}
        return state, la.merge_layers(new, layered), metrics

    def aggregate_modules(state, global_adapters, clients, weights, rank_mask, rng):
        g, cl = traverse_util.flatten_dict(global_adapters), traverse_util.flatten_dict(clients)
        p, ref = la.probabilities(weights), jnp.argmax(weights)
        present = weights.astype(jnp.float32).sum() > 0
        new, delta = dict(g), dict(traverse_util.flatten_dict(state['delta']))
        nums, dens, upds, errs = [], [], [], []
        for i, path in enumerate(la.module_paths(global_adapters)):
            ga, gb = g[path + ('a', )], g[path + ('b', )]
            kshape, r = ga.shape[:-1], ga.shape[-1]
            a, b = la.module_factors(cl, cl, path)
            abar, bbar = la.factor_means(a, b, p, ref, weights, rank_mask, ga.reshape(-1, r), gb)
            num2 = la.product_sq_norm(*la.residual_factors(a, b, p, ref, abar, bbar))
            den2 = la.product_sq_norm(*la.stack_factors(a, b, p))
            key = None if rng is None else jax.random.fold_in(rng, i)
            abar, bbar, inc, upd2 = rule(a, b, p, ref, abar, bbar, ga.reshape(-1, r), gb, hp, key)
            if inc is not None:
                kp = path + ('kernel', )
                delta[kp] = jnp.where(present,
                                      delta[kp] + hp.alpha / r * inc.reshape(delta[kp].shape),
                                      delta[kp])
            new[path + ('a', )] = jnp.where(present, abar.reshape(kshape + (r, )), ga)
            new[path + ('b', )] = jnp.where(present, bbar, gb)
            nums.append(num2)
            dens.append(den2)
            upds.append(upd2)
            errs.append(la.norm_ratio(num2, den2))
        metrics = {
            'lora_agg_error': la.norm_ratio(sum(nums), sum(dens)),
            'lora_agg_error_mean': jnp.mean(jnp.stack(errs)),
            'lora_update_error': la.norm_ratio(sum(upds), sum(dens)),
        }
        state = {**state, 'delta': traverse_util.unflatten_dict(delta)}
        return state, traverse_util.unflatten_dict(new), metrics

    return RuleAggregator(lambda global_adapters: init_state(method, global_adapters), aggregate,
                          download, upload)
