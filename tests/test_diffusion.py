"""fedgen.models.diffusion: schedules, forward noising, epsilon loss and the two samplers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.models import diffusion


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind):
    s = diffusion.make_schedule(kind, 1000)
    ab = np.asarray(s.alpha_bars)
    assert ab.shape == (1000, ) and ab.dtype == np.float32
    assert np.all(ab > 0) and np.all(ab < 1)
    assert np.all(np.diff(ab) < 0)
    assert s.num_timesteps == 1000


def test_linear_schedule_values_by_hand():
    s = diffusion.linear_schedule(3, 0.1, 0.3)
    np.testing.assert_allclose(s.betas, [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bars, [0.9, 0.72, 0.504], rtol=1e-6)
    # beta~_1 = 0.2 (1 - 0.9) / (1 - 0.72); beta~_0 = 0 and its log is clipped to log beta~_1.
    np.testing.assert_allclose(s.posterior_variance, [0.0, 0.02 / 0.28, 0.3 * 0.28 / 0.496],
                               rtol=1e-6)
    np.testing.assert_allclose(s.posterior_log_variance[0], math.log(0.02 / 0.28), rtol=1e-6)
    np.testing.assert_allclose(s.posterior_mean_coef1[2], math.sqrt(0.72) * 0.3 / 0.496, rtol=1e-6)
    np.testing.assert_allclose(s.posterior_mean_coef2[2], math.sqrt(0.7) * 0.28 / 0.496, rtol=1e-6)


def test_cosine_schedule_matches_closed_form_alpha_bar():
    T, s_off = 1000, 0.008
    s = diffusion.cosine_schedule(T, s_off)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2)**2
    for t in [0, 100, 500, 900]:
        # alpha_bars[t] is the product of the first t+1 alphas, i.e. alpha_bar(t+1).
        np.testing.assert_allclose(s.alpha_bars[t], f(t + 1) / f(0), rtol=1e-4)
    assert np.max(np.asarray(s.betas)) <= np.float32(0.999)


def test_q_sample_moments_match_closed_form():
    s = diffusion.linear_schedule(1000)
    x0 = jnp.array([[0.9], [-0.5], [0.3], [-1.0]], jnp.float32)  # [N=4, 1]
    t = jnp.array([0, 200, 600, 999], jnp.int32)
    k = 40_000
    noise = jax.random.normal(jax.random.key(0), (k, 4, 1))
    xt = jax.vmap(lambda e: diffusion.q_sample(s, x0, t, e))(noise)[..., 0]  # [k, 4]
    ab = np.asarray(s.alpha_bars)[np.asarray(t)]
    mean = np.sqrt(ab) * np.asarray(x0[:, 0])
    var = 1.0 - ab
    # 5 standard errors: SE(mean) = sqrt(var / k), SE(var) = var sqrt(2 / (k - 1)).
    assert np.all(np.abs(np.mean(xt, 0) - mean) < 5 * np.sqrt(var / k))
    assert np.all(np.abs(np.var(xt, 0, ddof=1) - var) < 5 * var * np.sqrt(2 / (k - 1)))


def test_eps_loss_terms_shape_and_oracle():
    s = diffusion.linear_schedule(100)
    x0 = jax.random.uniform(jax.random.key(1), (6, 4, 4, 3), minval=-1, maxval=1)
    zero = diffusion.eps_loss_terms(lambda x, t: jnp.zeros_like(x), s, x0, jax.random.key(2))
    assert zero.shape == (6, )
    # eps_hat = 0 gives the mean square of the drawn noise: chi^2 / 48, mean 1, sd sqrt(2/48).
    assert np.all(np.abs(np.asarray(zero) - 1) < 5 * math.sqrt(2 / 48))

    # An oracle that knows x0 recovers eps exactly from x_t: loss ~ float rounding.
    def oracle(x, t):
        ab = s.alpha_bars[t][:, None, None, None]
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)

    exact = diffusion.eps_loss_terms(oracle, s, x0, jax.random.key(2))
    assert np.all(np.asarray(exact) < 1e-6)


def _linear_eps(x, t):
    return 0.5 * jnp.tanh(x) + 0.3 * (t.astype(jnp.float32) / 40)[:, None]


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_samplers_shape_deterministic_and_rng_dependent(sampler):
    s = diffusion.linear_schedule(40, 1e-3, 0.2)
    if sampler == 'ddpm':
        run = jax.jit(lambda r: diffusion.ddpm_sample(_linear_eps, s, (3, 5), r))
    else:
        run = jax.jit(lambda r: diffusion.ddim_sample(_linear_eps, s, (3, 5), r, 10, eta=0.5))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    assert a.shape == (3, 5) and a.dtype == jnp.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) > 1e-2


def test_ddim_eta1_full_steps_equals_ddpm():
    # With sigma^2 = beta~_t every step and the same noise, the DDIM update is algebraically the
    # DDPM posterior mean plus the same noise, so the two samplers agree to float32 rounding.
    s = diffusion.cosine_schedule(60)
    rng = jax.random.key(3)
    ddpm = jax.jit(lambda r: diffusion.ddpm_sample(_linear_eps, s, (4, 6), r))(rng)
    ddim = jax.jit(lambda r: diffusion.ddim_sample(_linear_eps, s, (4, 6), r, 60, eta=1.0))(rng)
    assert np.all(np.isfinite(ddim))
    np.testing.assert_allclose(ddim, ddpm, atol=1e-5)


@pytest.mark.parametrize('num_steps', [None, 1, 7, 50])
def test_samplers_recover_point_mass_with_oracle_eps(num_steps):
    # For data = one point c, E[eps | x_t] = (x_t - sqrt(ab_t) c) / sqrt(1 - ab_t) makes every
    # x0 prediction equal c, so both samplers must return c up to rounding.
    s = diffusion.linear_schedule(50, 1e-3, 0.2)
    c = jnp.linspace(-0.9, 0.9, 8).reshape(1, 8)

    def oracle(x, t):
        ab = s.alpha_bars[t][:, None]
        return (x - jnp.sqrt(ab) * c) / jnp.sqrt(1 - ab)

    if num_steps is None:
        out = diffusion.ddpm_sample(oracle, s, (3, 8), jax.random.key(4))
    else:
        out = diffusion.ddim_sample(oracle, s, (3, 8), jax.random.key(4), num_steps, eta=0.3)
    np.testing.assert_allclose(out, jnp.broadcast_to(c, (3, 8)), atol=1e-5)


def test_x0_predictions_are_clipped():
    # eps_hat = -100 pushes x0_hat far above 1; the clip keeps the final sample in [-1, 1].
    s = diffusion.linear_schedule(20, 1e-3, 0.2)
    huge = lambda x, t: jnp.full_like(x, -100.0)
    out = diffusion.ddim_sample(huge, s, (2, 3), jax.random.key(5), 20)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    out = diffusion.ddpm_sample(huge, s, (2, 3), jax.random.key(5))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_ddim_timesteps_spacing():
    np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 1), [9])
    ts = diffusion.ddim_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)


@pytest.mark.parametrize('call, field', [
    (lambda: diffusion.make_schedule('quadratic', 10), 'diffusion.schedule'),
    (lambda: diffusion.make_schedule('linear', 0), 'diffusion.timesteps'),
    (lambda: diffusion.cosine_schedule(10.5), 'diffusion.timesteps'),
    (lambda: diffusion.linear_schedule(10, 0.1, 0.01), 'diffusion.beta_start'),
    (lambda: diffusion.linear_schedule(10, 1e-4, 1.0), 'diffusion.beta_end'),
    (lambda: diffusion.cosine_schedule(10, 0.0), 'diffusion.cosine_s'),
    (lambda: diffusion.ddim_timesteps(10, 0), 'diffusion.sample_steps'),
    (lambda: diffusion.ddim_timesteps(10, 11), 'diffusion.sample_steps'),
    (lambda: diffusion.
     ddim_sample(_linear_eps, diffusion.linear_schedule(10),
                 (1, 2), jax.random.key(0), 5, eta=-1.0), 'diffusion.ddim_eta'),
])
def test_errors_name_the_field(call, field):
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        call()
