"""Private aggregation of one round: clip -> (secure) sum -> Gaussian noise -> / expected count.

    mean = (sum_{k in U} clip(D_k, S_t) + N(0, (z_D S_t)^2 I)) / m
with U the clients whose update reaches the server (``survived``; all ``present`` by default),
z_D the update's share of the noise (``dp.delta_noise_multiplier``), m the expected client count.
With ``secagg`` the sum is computed over the ring Z_{2^b} on the quantized clipped updates (each
clipped to S_t - 1.5 sqrt(D) / s_t first, so the dequantized update keeps norm <= S_t); the server
sees only that sum, and adds the noise after unmasking, so it is still trusted with the noise
(docs/privacy.md, trust models). ``private_mean`` is the composition of the blocks in
``privacy.blocks`` (clip, adaptive_clip, plain_sum / secure_sum, divide_by_expected,
gaussian_noise), exported here for aggregation pipelines.

Shapes: ``stacked`` leaves [C, ...]; ``present``, ``survived``, ``ids`` [C]. Everything is
traceable; ``dp`` and ``secagg`` are pytrees whose numbers are traced, so a new value of z, S, m
or the scale does not recompile (``dp.adaptive``, ``secagg.bits`` and ``secagg.simulate_masks``
are static).

Metrics: ``COVERED_METRICS`` fall inside epsilon, ``DIAGNOSTIC_METRICS`` outside it
(``split_metrics``).
"""
from typing import Optional

from fedgen.privacy import dp as dp_lib
from fedgen.privacy.blocks import (COVERED_METRICS, DIAGNOSTIC_METRICS, adaptive_clip, clip,
                                   divide_by_expected, gaussian_noise, plain_sum, private_mean,
                                   secure_sum, split_metrics)
from fedgen.privacy.dp import ClipState, DPParams
from fedgen.privacy.secagg import SecAggParams

__all__ = [
    'COVERED_METRICS', 'ClipState', 'DIAGNOSTIC_METRICS', 'DPParams', 'SecAggParams',
    'adaptive_clip', 'aux_init', 'clip', 'divide_by_expected', 'gaussian_noise', 'init',
    'plain_sum', 'private_mean', 'reducer', 'secure_sum', 'split_metrics'
]


def init(params: DPParams) -> ClipState:
    """The server's privacy state: the clip norm S_0."""
    return dp_lib.init_clip_state(params)


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
