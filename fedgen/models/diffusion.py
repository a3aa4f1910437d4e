"""Gaussian diffusion (DDPM, Ho et al. 2020): noise schedules, forward noising, epsilon loss,
ancestral (DDPM) and DDIM samplers. Pure functions; the samplers are ``lax.scan`` loops.

Notation, for t = 0 .. T-1 (index t is the paper's step t+1):

    alpha_t = 1 - beta_t,   alpha_bar_t = prod_{s <= t} alpha_s,   alpha_bar_{-1} = 1
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I), with
        c1_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
        c2_t = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
        beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)

An ``eps_fn(x_t [N, ...], t [N] int32) -> eps_hat [N, ...]`` is the model (e.g. a closure over
``UNet.apply`` with frozen params and adapters); callers jit the sampler with it closed over.
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


class Schedule(NamedTuple):
    """Per-step float32 arrays, each of shape [T] (see the module docstring for the equations)."""
    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    alpha_bars_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alpha_bars: jax.Array
    sqrt_one_minus_alpha_bars: jax.Array
    sqrt_recip_alpha_bars: jax.Array  # 1 / sqrt(alpha_bar_t)
    sqrt_recipm1_alpha_bars: jax.Array  # sqrt(1 / alpha_bar_t - 1)
    posterior_variance: jax.Array  # beta~_t (0 at t = 0)
    posterior_log_variance: jax.Array  # log beta~_t, with t = 0 clipped to log beta~_1
    posterior_mean_coef1: jax.Array  # c1_t, multiplies x_0
    posterior_mean_coef2: jax.Array  # c2_t, multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def _check_timesteps(T) -> None:
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f'diffusion.timesteps must be an int >= 1, got {T!r}')


def schedule_from_betas(betas) -> Schedule:
    """Builds every derived array from betas [T] in float64, then stores float32.

    Raises ValueError unless every beta is in (0, 1).
    """
    b = np.asarray(betas, np.float64)
    if b.ndim != 1 or b.size < 1 or not np.all((b > 0) & (b < 1)):
        raise ValueError('diffusion.betas must be a non-empty 1-D array with values in (0, 1)')
    a = 1.0 - b
    ab = np.cumprod(a)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    # beta~_0 = 0; the log is clipped to beta~_1 so it stays finite (as in DDPM).
    post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]) if b.size > 1 else b)
    arrays = dict(betas=b,
                  alphas=a,
                  alpha_bars=ab,
                  alpha_bars_prev=ab_prev,
                  sqrt_alpha_bars=np.sqrt(ab),
                  sqrt_one_minus_alpha_bars=np.sqrt(1.0 - ab),
                  sqrt_recip_alpha_bars=np.sqrt(1.0 / ab),
                  sqrt_recipm1_alpha_bars=np.sqrt(1.0 / ab - 1.0),
                  posterior_variance=post_var,
                  posterior_log_variance=post_log_var,
                  posterior_mean_coef1=np.sqrt(ab_prev) * b / (1.0 - ab),
                  posterior_mean_coef2=np.sqrt(a) * (1.0 - ab_prev) / (1.0 - ab))
    return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """beta_t linear from beta_start to beta_end over T steps (DDPM).

    Defaults are DDPM's for T = 1000; beta_end <= 0.02 keeps alpha_bar_{T-1} near 4e-5.
    """
    _check_timesteps(T)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError('diffusion.beta_start/diffusion.beta_end must satisfy 0 < beta_start <= '
                         f'beta_end < 1, got {beta_start!r}, {beta_end!r}')
    return schedule_from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_schedule(T: int = 1000, s: float = 0.008) -> Schedule:
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/T + s) / (1+s)).

    beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), 0.999), t = 0 .. T-1.
    """
    _check_timesteps(T)
    if not 0 < s < 1:
        raise ValueError(f'diffusion.cosine_s must be in (0, 1), got {s!r}')
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * math.pi / 2)**2
    return schedule_from_betas(np.minimum(1.0 - f[1:] / f[:-1], 0.999))


SCHEDULES = {'linear': linear_schedule, 'cosine': cosine_schedule}


def make_schedule(kind: str, T: int = 1000) -> Schedule:
    """Schedule by name ('linear' or 'cosine') with default betas and T steps."""
    if kind not in SCHEDULES:
        raise ValueError(f'diffusion.schedule must be one of {sorted(SCHEDULES)}, got {kind!r}')
    return SCHEDULES[kind](T)


def _per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] reshaped to [N, 1, ..., 1] so it broadcasts against an [N, ...] array."""
    return values[t].reshape(t.shape + (1, ) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise. x0, noise [N, ...]; t [N] int."""
    return (_per_example(schedule.sqrt_alpha_bars, t, x0.ndim) * x0 +
            _per_example(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise)


def eps_loss_terms(eps_fn: EpsFn, schedule: Schedule, x0: jax.Array, rng: jax.Array) -> jax.Array:
    """Per-example epsilon-MSE [N] (Ho et al.'s L_simple before the batch mean).

    Draws t ~ U{0, .., T-1} [N] and eps ~ N(0, I) like x0 [N, ...] from ``rng`` and returns
    mean over all non-batch axes of (eps_fn(x_t, t) - eps)^2. Weighting and reduction over the
    batch (e.g. with a step mask) are the caller's.
    """
    t_key, noise_key = jax.random.split(rng)
    t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    err = eps_fn(q_sample(schedule, x0, t, noise), t) - noise
    return jnp.mean(jnp.square(err), axis=tuple(range(1, x0.ndim)))


def _predict_x0(schedule: Schedule, x: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to [-1, 1]."""
    x0 = (_per_example(schedule.sqrt_recip_alpha_bars, t, x.ndim) * x -
          _per_example(schedule.sqrt_recipm1_alpha_bars, t, x.ndim) * eps)
    return jnp.clip(x0, -1.0, 1.0)


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, shape, rng: jax.Array) -> jax.Array:
    """Ancestral sampling over all T steps; returns x_0 with ``shape`` [N, ...] (float32).

    x_{T-1} ~ N(0, I); for t = T-1 .. 0: x0_hat = clip(predict_x0(x_t, eps_fn(x_t, t))),
    x_{t-1} = c1_t x0_hat + c2_t x_t + [t > 0] sqrt(beta~_t) z. The same rng gives the same
    samples; the noise matches :func:`ddim_sample` with eta = 1 and num_steps = T, which then
    returns the same x_0.
    """
    n = shape[0]
    init_key, steps_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32)
    ts = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    keys = jax.random.split(steps_key, schedule.num_timesteps)

    def step(x, inputs):
        t, key = inputs
        tv = jnp.full((n, ), t, jnp.int32)
        x0 = _predict_x0(schedule, x, tv, eps_fn(x, tv))
        mean = (_per_example(schedule.posterior_mean_coef1, tv, x.ndim) * x0 +
                _per_example(schedule.posterior_mean_coef2, tv, x.ndim) * x)
        std = jnp.where(t > 0, jnp.exp(0.5 * schedule.posterior_log_variance[t]), 0.0)
        return mean + std * jax.random.normal(key, shape, jnp.float32), None

    x, _ = jax.lax.scan(step, x, (ts, keys))
    return x


def ddim_timesteps(T: int, num_steps: int) -> np.ndarray:
    """Descending int32 [num_steps]: num_steps evenly spaced steps from T-1 down to 0.

    With num_steps == T this is every step; with num_steps == 1 it is just T-1.
    """
    _check_timesteps(T)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f'diffusion.sample_steps must be an int in [1, {T}], got {num_steps!r}')
    # Spacing (T-1)/(num_steps-1) >= 1, so rounding keeps the steps distinct.
    return np.round(np.linspace(T - 1, 0, num_steps)).astype(np.int32)


def ddim_sample(eps_fn: EpsFn,
                schedule: Schedule,
                shape,
                rng: jax.Array,
                num_steps: int,
                eta: float = 0.0) -> jax.Array:
    """DDIM (Song et al. 2021) over :func:`ddim_timesteps`; returns x_0 with ``shape`` [N, ...].

    At step t with previous step p (alpha_bar_{-1} = 1 after the last step):
        x0_hat = clip(predict_x0(x_t, eps_fn(x_t, t))),
        eps' = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)   (consistent with the clipped x0_hat)
        sigma = eta sqrt((1 - ab_p) / (1 - ab_t)) sqrt(1 - ab_t / ab_p)
        x_p = sqrt(ab_p) x0_hat + sqrt(1 - ab_p - sigma^2) eps' + sigma z.
    eta = 0 is deterministic given x_{T-1}; eta = 1 with num_steps = T is ancestral DDPM.
    ``num_steps`` must be a Python int (it fixes the scan length).
    """
    T = schedule.num_timesteps
    ts_np = ddim_timesteps(T, num_steps)
    if isinstance(eta, (int, float)) and not eta >= 0:
        raise ValueError(f'diffusion.ddim_eta must be >= 0, got {eta!r}')
    n = shape[0]
    ab_all = jnp.concatenate([schedule.alpha_bars, jnp.ones((1, ), jnp.float32)])
    ts = jnp.asarray(ts_np)
    # Index -1 of ab_all is the final alpha_bar = 1 (x_p is then x0_hat).
    prevs = jnp.asarray(np.concatenate([ts_np[1:], [-1]]).astype(np.int32))
    init_key, steps_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32)
    keys = jax.random.split(steps_key, num_steps)

    def step(x, inputs):
        t, prev, key = inputs
        tv = jnp.full((n, ), t, jnp.int32)
        x0 = _predict_x0(schedule, x, tv, eps_fn(x, tv))
        ab_t, ab_p = ab_all[t], ab_all[prev]
        eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
        sigma = eta * jnp.sqrt((1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p))
        # Clamp: the difference is >= 0 analytically but can round below it in float32.
        dir_scale = jnp.sqrt(jnp.maximum(1.0 - ab_p - sigma**2, 0.0))
        noise = jax.random.normal(key, shape, jnp.float32)
        return jnp.sqrt(ab_p) * x0 + dir_scale * eps + sigma * noise, None

    x, _ = jax.lax.scan(step, x, (ts, prevs, keys))
    return x
