"""Private aggregation of one round: clip -> (secure sum) -> Gaussian noise -> / expected count.

    mean = (sum_{k in U} clip(D_k, S_t) + N(0, (z_D S_t)^2 I)) / m
with U the clients whose update reaches the server (``survived``; all ``present`` by default),
z_D the update's share of the noise (``dp.delta_noise_multiplier``), m the expected client count.
With ``secagg`` the sum is computed by the simulated pairwise-masking protocol on the quantized
clipped updates (the server sees only the masked sum); the noise is added by the server after
unmasking, so the server is still trusted with the noise (docs/privacy.md, trust models).

Shapes: ``stacked`` leaves [C, ...]; ``present``, ``survived``, ``ids`` [C]. The whole function is
traceable; ``dp`` and ``secagg`` are pytrees whose numbers are traced, so a new value of z, S, m
or the scale does not recompile (``dp.adaptive`` and ``secagg.bits`` are static).
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from fedgen.privacy import dp as dp_lib
from fedgen.privacy import secagg as secagg_lib
from fedgen.privacy.dp import ClipState, DPParams
from fedgen.privacy.secagg import SecAggParams

PyTree = Any

__all__ = ['ClipState', 'DPParams', 'SecAggParams', 'aux_init', 'init', 'private_mean', 'reducer']


def init(params: DPParams) -> ClipState:
    """The server's privacy state: the clip norm S_0."""
    return dp_lib.init_clip_state(params)


def private_mean(stacked: PyTree,
                 present: jax.Array,
                 state: ClipState,
                 key: jax.Array,
                 params: DPParams,
                 secagg: Optional[SecAggParams] = None,
                 ids: Optional[jax.Array] = None,
                 survived: Optional[jax.Array] = None) -> Tuple[PyTree, ClipState, dict]:
    """One round's private mean: (mean tree like one client, new ClipState, metrics).

    present: [C] clients that took part (masked their input, under SecAgg); survived: [C] those
    whose upload arrived (defaults to present; dropouts after masking are present & ~survived).
    ids: [C] distinct client ids, keying pair seeds and rounding noise (defaults to 0..C-1).
    key: this round's key (fold_in(run key, round)); split here into noise, count and SecAgg.
    """
    present = present.astype(jnp.float32)
    survived = present if survived is None else survived.astype(jnp.float32) * present
    if ids is None:
        ids = jnp.arange(present.shape[0], dtype=jnp.int32)
    k_noise, k_count, k_sec = jax.random.split(key, 3)
    s_t = state.clip_norm
    clipped, norms = dp_lib.clip(stacked, s_t)
    std = dp_lib.noise_std(dp_lib.delta_noise_multiplier(params), s_t)
    metrics = dp_lib.clip_metrics(norms, survived, s_t)
    if secagg is None:
        mean = dp_lib.mean_plus_noise(clipped, survived, std, params.expected_clients, k_noise)
    else:
        flat, unflatten = secagg_lib.flatten(clipped)
        # Under adaptive clipping S_t moves; never use a scale that could overflow at S_t.
        scale = jnp.minimum(
            jnp.asarray(secagg.scale, jnp.float32),
            secagg_lib.max_scale(jnp.asarray(s_t, jnp.float32), present.shape[0], secagg.bits))
        total, sec_metrics = secagg_lib.secure_sum(flat, ids, present, survived, scale, secagg.bits,
                                                   k_sec)
        metrics.update(sec_metrics)
        m = jnp.asarray(params.expected_clients, jnp.float32)
        mean = dp_lib.add_noise(unflatten(total / m), std / m, k_noise)
    metrics['dp_noise_std'] = std / jnp.asarray(params.expected_clients, jnp.float32)
    if params.adaptive:
        state, adaptive_metrics = dp_lib.update_adaptive(state, norms, survived, params, k_count)
        metrics.update(adaptive_metrics)
    return mean, state, metrics


def reducer(params: DPParams, secagg: Optional[SecAggParams] = None):
    """The engine's reduction (engine.Reducer) for DP-FedAvg, with or without SecAgg.

    Uniform weights: the n_k in ``weights`` are ignored (they would break the sensitivity bound);
    clients that took part are info['sampled'], those whose upload arrived info['live']. The clip
    state lives in the server's ``aux['dp']`` (initialise it with :func:`aux_init`)."""

    def reduce(uploads, weights, key, aux, info):
        del weights
        mean, state, metrics = private_mean(uploads, info['sampled'], aux['dp'], key, params,
                                            secagg, info['ids'], info['live'])
        return mean, {**aux, 'dp': state}, metrics

    return reduce


def aux_init(params: DPParams):
    """The server-side state DP adds to ServerState.aux: {'dp': ClipState}."""
    return lambda trainable: {'dp': init(params)}
