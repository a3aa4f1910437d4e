"""The building blocks of the private mean, each a small pure function over stacked pytrees.

``privacy.private_mean`` is their composition, and an aggregation pipeline can chain them too:

    clip(S_t)              D_k <- D_k min(1, S_t / ||D_k||)                  [C, ...] -> [C, ...]
    adaptive_clip          S_{t+1} = S_t exp(-eta (b~ - gamma)), b~ privatised (dp.update_adaptive)
    secure_sum(bits)       sum_{k in U} Q(clip(D_k, S'_t)) / s_t over Z_{2^b}           -> [...]
      or plain_sum         sum_k w_k D_k in float32                                      -> [...]
    divide_by_expected(m)  x / m
    gaussian_noise(std)    x + std N(0, I)

so that, with U the clients whose upload arrived and m the expected count,
    mean = (sum_{k in U} clip(D_k, S_t) + N(0, (z_D S_t)^2 I)) / m.
Division is linear, so ``divide_by_expected`` is applied where it costs one multiply and gives the
FedAvg numbers: to the [C] weights of a float sum (then z = 0, S = inf, m = |U| is bit for bit
``aggregate.weighted_mean``), to the [...] result of a ring sum, and to the noise std z_D S_t.

Metrics fall in two groups. ``COVERED_METRICS`` are functions of the noised outputs and of public
settings only, so the (epsilon, delta) guarantee covers them. ``DIAGNOSTIC_METRICS`` are computed
from raw client updates or reveal who took part: epsilon does not cover them, and a DP run should
publish them only when asked (``fed.dp.log_diagnostics``).
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from fedgen.privacy import dp as dp_lib
from fedgen.privacy import secagg as secagg_lib
from fedgen.privacy.dp import ClipState, DPParams
from fedgen.privacy.secagg import SecAggParams

PyTree = Any

# Functions of the noised aggregate, the privatised count and public settings: inside epsilon.
COVERED_METRICS = ('dp_clip_norm', 'dp_noise_std', 'dp_below_clip_frac', 'secagg_scale',
                   'secagg_clip_norm')
# Computed from raw client updates or from who took part (the realised count under Poisson
# sampling, dropouts): outside epsilon.
DIAGNOSTIC_METRICS = ('dp_mean_update_norm', 'dp_clipped_frac', 'secagg_survived', 'secagg_dropped')


def clip(stacked: PyTree, clip_norm) -> Tuple[PyTree, jax.Array]:
    """(D_k min(1, S / ||D_k||) like ``stacked``, ||D_k|| [C]); clients under S are bit-exact."""
    return dp_lib.clip(stacked, clip_norm)


def adaptive_clip(state: ClipState, norms: jax.Array, present: jax.Array, params: DPParams,
                  key: jax.Array) -> Tuple[ClipState, dict]:
    """The next clip norm S_{t+1} from the privatised count of clients with ||D_k|| <= S_t."""
    return dp_lib.update_adaptive(state, norms, present, params, key)


def plain_sum(clipped: PyTree, weights: jax.Array) -> PyTree:
    """sum_k w_k D_k, a tree like one client; w [C] (survived / m for the DP mean)."""
    w = weights.astype(jnp.float32)
    return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), clipped)


def secure_sum(clipped: PyTree,
               ids: jax.Array,
               present: jax.Array,
               survived: jax.Array,
               clip_norm,
               secagg: SecAggParams,
               key: jax.Array,
               clip_norm_0=None) -> Tuple[PyTree, dict]:
    """sum_{k in U2} q_k / s_t over Z_{2^b}, a tree like one client, and its metrics.

    clipped: [C, ...] updates of norm <= S_t = ``clip_norm``; present: [C] U1 (masked an input);
    survived: [C] U2 (input arrived); ids: [C] distinct client ids; clip_norm_0: S_0, the clip norm
    that ``secagg.scale`` was chosen for (defaults to S_t). The round's scale is
    s_t = ``secagg.round_scale`` and every update is clipped again to S'_t = S_t - 1.5 sqrt(D)/s_t,
    so a dequantized update has norm <= S_t: the sum keeps sensitivity S_t (``secagg`` docstring).
    """
    flat, unflatten = secagg_lib.flatten(clipped)
    n, d = flat.shape
    s_0 = clip_norm if clip_norm_0 is None else clip_norm_0
    scale = secagg_lib.round_scale(secagg.scale, s_0, clip_norm, n, secagg.bits)
    s_prime = secagg_lib.quantization_clip_norm(jnp.asarray(clip_norm, jnp.float32), scale, d)
    flat, _ = dp_lib.clip(flat, s_prime)
    total, metrics = secagg_lib.secure_sum(flat, ids, present, survived, scale, secagg.bits, key,
                                           secagg.simulate_masks)
    metrics['secagg_clip_norm'] = s_prime
    return unflatten(total), metrics


def divide_by_expected(x: PyTree, expected_clients) -> PyTree:
    """x / m for an array or a tree (m = q N under Poisson sampling, the fixed count otherwise)."""
    m = jnp.asarray(expected_clients, jnp.float32)
    return jax.tree.map(lambda v: v / m.astype(v.dtype), x)


def gaussian_noise(tree: PyTree, std, key: jax.Array) -> PyTree:
    """tree + std N(0, I), independent per coordinate (one key per leaf)."""
    return dp_lib.add_noise(tree, std, key)


def split_metrics(metrics: dict) -> Tuple[dict, dict]:
    """(covered by epsilon, diagnostics outside it); every name falls in exactly one group."""
    covered = {k: v for k, v in metrics.items() if k not in DIAGNOSTIC_METRICS}
    return covered, {k: v for k, v in metrics.items() if k in DIAGNOSTIC_METRICS}


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
    No present or surviving client is a valid round: the sum is 0 and the mean is noise / m.
    """
    present = present.astype(jnp.float32)
    survived = present if survived is None else survived.astype(jnp.float32) * present
    if ids is None:
        ids = jnp.arange(present.shape[0], dtype=jnp.int32)
    k_noise, k_count, k_sec = jax.random.split(key, 3)
    s_t, m = state.clip_norm, params.expected_clients
    clipped, norms = clip(stacked, s_t)
    metrics = dp_lib.clip_metrics(norms, survived, s_t)
    if secagg is None:
        total = plain_sum(clipped, divide_by_expected(survived, m))
    else:
        total, sec_metrics = secure_sum(clipped, ids, present, survived, s_t, secagg, k_sec,
                                        params.clip_norm)
        metrics.update(sec_metrics)
        total = divide_by_expected(total, m)
    std = divide_by_expected(dp_lib.noise_std(dp_lib.delta_noise_multiplier(params), s_t), m)
    mean = gaussian_noise(total, std, k_noise)
    metrics['dp_noise_std'] = std
    if params.adaptive:
        state, adaptive_metrics = adaptive_clip(state, norms, survived, params, k_count)
        metrics.update(adaptive_metrics)
    return mean, state, metrics
