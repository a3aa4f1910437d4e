"""User-level DP-FedAvg (central model): per-client clipping, Gaussian noise, adaptive clipping.

Shapes: ``stacked`` is a pytree whose leaves are [C, ...] (C = padded clients per round),
``present`` is [C] with 1 for a client whose update is summed and 0 for padding or a dropout.

Clipping (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"), with
the global L2 norm over the client's whole uploaded tree:
    ||D_k|| = sqrt(sum_leaves sum_i D_k[i]^2),    D_k <- D_k * min(1, S / ||D_k||).
Noisy mean:
    mean = (sum_k present_k D_k + N(0, (z S)^2 I)) / m
where m is the EXPECTED number of clients per round (q N under Poisson sampling, the fixed per-round
count otherwise), not the realised count: dividing by the realised count would make the output
depend on whether a user took part beyond the sensitivity-S sum. For the same reason the weights are
uniform: weighting by the local example count n_k lets one user move the sum by n_k S / sum n,
unbounded by S, so DP-FedAvg here is the uniform-weight mean, never the n_k-weighted one.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"):
the clip norm tracks the gamma-quantile of the update norms. Each client reports b_k = 1[||D_k||
<= S_t]; the server privatises the count of clients under the bound and takes a geometric step
    b~ = (sum_k present_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2,
    S_{t+1} = S_t exp(-eta (b~ - gamma)).
Centering b_k at 1/2 halves the count's sensitivity to 1/2. The two Gaussian queries (the sum, with
sensitivity S_t and noise z_D S_t; the count, with sensitivity 1/2 and noise sigma_b) compose to one
Gaussian mechanism of noise multiplier z with z^-2 = z_D^-2 + (2 sigma_b)^-2, so for the z the
accountant sees, the update sum gets (paper, Sec. 3.1)
    z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2),      which needs sigma_b > z / 2.
The paper's defaults: gamma = 0.5, eta = 0.2, sigma_b = m / 20.
"""
import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

# A clipped client is scaled by S / ||D|| * (1 - _MARGIN) so that the norm of the float32 result,
# recomputed with float32 rounding, is still <= S: the sensitivity bound holds for the numbers the
# mechanism actually sums, not only in exact arithmetic.
_MARGIN = 1e-6


@struct.dataclass
class DPParams:
    """DP hyper-parameters; numeric fields are traced (changing them does not recompile)."""
    clip_norm: float  # S (S_0 under adaptive clipping); inf = no clipping (only with z = 0)
    noise_multiplier: float  # z, the multiplier the accountant sees
    expected_clients: float  # m: q N (Poisson) or clients per round (fixed)
    target_quantile: float = 0.5  # gamma (adaptive)
    clip_lr: float = 0.2  # eta, geometric step of the clip norm (adaptive)
    count_stddev: float = 0.0  # sigma_b, noise on the count of clients under the bound (adaptive)
    adaptive: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class ClipState:
    """Server state of the clip norm: S_t (constant unless adaptive)."""
    clip_norm: jax.Array  # [] float32


def make_params(clip_norm: float,
                noise_multiplier: float,
                expected_clients: float,
                adaptive: bool = False,
                target_quantile: float = 0.5,
                clip_lr: float = 0.2,
                count_stddev: float = -1.0,
                *,
                section: str = '') -> DPParams:
    """Validated DPParams; count_stddev < 0 picks the paper's default m / 20. Errors name the
    fields dp.clip_norm, dp.noise_multiplier, ... and num_clients after ``section``.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not clip_norm > 0:
        raise ValueError(f'{section}dp.clip_norm must be > 0, got {clip_norm}')
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f'{section}dp.noise_multiplier must be finite and >= 0, '
                         f'got {noise_multiplier}')
    if noise_multiplier > 0 and math.isinf(clip_norm):
        raise ValueError(f'{section}dp.clip_norm must be finite when '
                         f'{section}dp.noise_multiplier > 0')
    if not expected_clients >= 1:
        raise ValueError(f'expected clients per round ({section}dp sampling rate x '
                         f'{section}num_clients) must be >= 1, got {expected_clients}')
    if adaptive:
        if not 0 < target_quantile < 1:
            raise ValueError(f'{section}dp.target_quantile must be in (0, 1), '
                             f'got {target_quantile}')
        if not clip_lr > 0:
            raise ValueError(f'{section}dp.clip_lr must be > 0, got {clip_lr}')
        if count_stddev < 0:
            count_stddev = expected_clients / 20.0
        if noise_multiplier > 0 and not count_stddev > noise_multiplier / 2:
            raise ValueError(
                f'{section}dp.count_stddev must exceed '
                f'{section}dp.noise_multiplier / 2 = {noise_multiplier / 2} (noise split), '
                f'got {count_stddev}')
    return DPParams(float(clip_norm), float(noise_multiplier), float(expected_clients),
                    float(target_quantile), float(clip_lr), float(max(count_stddev, 0.0)),
                    bool(adaptive))


def init_clip_state(params: DPParams) -> ClipState:
    """S_0 = params.clip_norm."""
    return ClipState(jnp.asarray(params.clip_norm, jnp.float32))


def client_norms(stacked: PyTree) -> jax.Array:
    """[C] global L2 norm of each client's whole tree (accumulated in float32)."""
    sq = [
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(stacked)
    ]
    return jnp.sqrt(sum(sq))


def clip(stacked: PyTree, clip_norm) -> Tuple[PyTree, jax.Array]:
    """(D_k min(1, S / ||D_k||), ||D_k|| [C]); a client with ||D_k|| <= S comes back bit-exact."""
    norms = client_norms(stacked)
    s = jnp.asarray(clip_norm, jnp.float32)
    over = norms > s
    factor = jnp.where(over, s / jnp.where(over, norms, 1.0) * (1.0 - _MARGIN), 1.0)
    clipped = jax.tree.map(
        lambda x: jnp.where(over.reshape((-1, ) + (1, ) * (x.ndim - 1)), (x * factor.reshape(
            (-1, ) + (1, ) * (x.ndim - 1)).astype(x.dtype)), x), stacked)
    return clipped, norms


def gaussian_like(tree: PyTree, key: jax.Array) -> PyTree:
    """Independent N(0, 1) per coordinate, shaped like ``tree`` (one key per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)])


def noise_std(z, clip_norm) -> jax.Array:
    """z S, with 0 (not nan) when z = 0 and S = inf."""
    z = jnp.asarray(z, jnp.float32)
    return jnp.where(z > 0, z * jnp.asarray(clip_norm, jnp.float32), 0.0)


def delta_noise_multiplier(params: DPParams) -> jax.Array:
    """z_D: all of z without adaptive clipping, else (z^-2 - (2 sigma_b)^-2)^(-1/2)."""
    z = jnp.asarray(params.noise_multiplier, jnp.float32)
    if not params.adaptive:
        return z
    inv = 1.0 / jnp.square(jnp.where(z > 0, z, 1.0)) - 1.0 / jnp.square(2.0 * params.count_stddev)
    return jnp.where(z > 0, jax.lax.rsqrt(jnp.maximum(inv, jnp.finfo(jnp.float32).tiny)), 0.0)


def mean_plus_noise(clipped: PyTree, present: jax.Array, std, expected_clients,
                    key: jax.Array) -> PyTree:
    """sum_k (present_k / m) D_k + (std / m) N(0, I); with std = 0 the noise term is exactly 0."""
    w = present.astype(jnp.float32) / jnp.asarray(expected_clients, jnp.float32)
    total = jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), clipped)
    return add_noise(total, std / jnp.asarray(expected_clients, jnp.float32), key)


def add_noise(tree: PyTree, std, key: jax.Array) -> PyTree:
    """tree + std * N(0, I) per coordinate."""
    noise = gaussian_like(tree, key)
    return jax.tree.map(lambda t, n: t + n * jnp.asarray(std, t.dtype), tree, noise)


def clip_metrics(norms: jax.Array, present: jax.Array, clip_norm) -> dict:
    """Diagnostics the (trusted) server sees: fraction of present clients clipped, mean norm."""
    p = present.astype(jnp.float32)
    n = jnp.maximum(p.sum(), 1.0)
    return {
        'dp_clip_norm': jnp.asarray(clip_norm, jnp.float32),
        'dp_clipped_frac': (p * (norms > clip_norm)).sum() / n,
        'dp_mean_update_norm': (p * norms).sum() / n,
    }


def noisy_mean(stacked: PyTree, present: jax.Array, clip_norm, z, expected_clients,
               key: jax.Array) -> Tuple[PyTree, dict]:
    """DP-FedAvg aggregate: (sum_k present_k clip(D_k, S) + N(0, (z S)^2 I)) / m.

    Uniform weights by design (see the module docstring); m is the expected client count. With
    z = 0 and S = inf this is bit-identical to ``aggregate.weighted_mean(stacked, present)`` when
    m = sum(present).
    """
    clipped, norms = clip(stacked, clip_norm)
    std = noise_std(z, clip_norm)
    mean = mean_plus_noise(clipped, present, std, expected_clients, key)
    metrics = clip_metrics(norms, present, clip_norm)
    metrics['dp_noise_std'] = std / jnp.asarray(expected_clients, jnp.float32)
    return mean, metrics


def update_adaptive(state: ClipState, norms: jax.Array, present: jax.Array, params: DPParams,
                    key: jax.Array) -> Tuple[ClipState, dict]:
    """One geometric quantile step: S_{t+1} = S_t exp(-eta (b~ - gamma)) with the privatised b~."""
    p = present.astype(jnp.float32)
    below = (norms <= state.clip_norm).astype(jnp.float32)
    noisy = (p * (below - 0.5)).sum() + params.count_stddev * jax.random.normal(key, ())
    b = noisy / params.expected_clients + 0.5
    new = state.clip_norm * jnp.exp(-params.clip_lr * (b - params.target_quantile))
    return ClipState(new.astype(jnp.float32)), {'dp_below_clip_frac': b}
