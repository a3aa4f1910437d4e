"""DP-FedAvg: exact clipping, noise scale, the z=0 / S=inf identity, adaptive clipping, a trace."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedgen import privacy
from fedgen.aggregators import weighting as aggregate
from fedgen.privacy import dp, secagg

C = 8


def _stacked(seed=0, dims=((3, 4), (5, ))):
    rng = np.random.default_rng(seed)
    tree = {f'w{i}': rng.normal(size=(C, ) + d).astype(np.float32) for i, d in enumerate(dims)}
    # Spread the client norms over two orders of magnitude, so some fall under any bound.
    scale = np.geomspace(0.05, 5.0, C).astype(np.float32)
    return jax.tree.map(lambda x: jnp.asarray(x * scale.reshape((-1, ) + (1, ) * (x.ndim - 1))),
                        tree)


def _np_norms(tree):
    return np.sqrt(
        sum(
            np.square(np.asarray(x, np.float64)).reshape(C, -1).sum(1)
            for x in jax.tree.leaves(tree)))


def test_clip_is_exact():
    stacked = _stacked()
    bound = 1.3
    clipped, norms = jax.jit(dp.clip)(stacked, bound)
    ref = _np_norms(stacked)
    np.testing.assert_allclose(np.asarray(norms), ref, rtol=2e-6)
    after = _np_norms(clipped)
    assert np.all(after <= bound), after  # float64 recomputation of the float32 result
    under = ref <= bound
    assert 0 < under.sum() < C
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a)[under], np.asarray(b)[under])
        # Clipped clients keep their direction and land on the bound (up to the 1e-6 margin).
        np.testing.assert_allclose(np.asarray(a)[~under],
                                   np.asarray(b)[~under] *
                                   (bound / ref[~under]).reshape((-1, ) + (1, ) * (a.ndim - 1)),
                                   rtol=5e-6)
    np.testing.assert_allclose(after[~under], bound, rtol=3e-6)


def test_zero_noise_infinite_clip_is_uniform_fedavg_exactly():
    stacked = _stacked(1)
    present = jnp.array([1, 0, 1, 1, 0, 1, 1, 1], jnp.float32)
    m = float(present.sum())
    key = jax.random.PRNGKey(3)
    mean, _ = jax.jit(dp.noisy_mean)(stacked, present, jnp.inf, 0.0, m, key)
    ref = jax.jit(aggregate.weighted_mean)(stacked, present)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = dp.make_params(math.inf, 0.0, m)
    out, _, metrics = jax.jit(privacy.private_mean)(stacked, present, privacy.init(params), key,
                                                    params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(metrics['dp_clipped_frac']) == 0.0


def test_noise_std_of_aggregate():
    z, bound, m = 1.3, 0.7, 5.0
    n = 40_000  # coordinates: the sample std has relative sd 1/sqrt(2n) = 0.0035
    stacked = {'a': jnp.zeros((C, 100, 200)), 'b': jnp.zeros((C, 20000))}
    present = jnp.array([1, 1, 0, 1, 1, 1, 0, 0], jnp.float32)
    mean, metrics = jax.jit(dp.noisy_mean)(stacked, present, bound, z, m, jax.random.PRNGKey(0))
    vals = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(mean)])
    assert vals.size == n
    want = z * bound / m
    assert abs(vals.std() / want - 1) < 5 / math.sqrt(2 * n)
    assert abs(vals.mean()) < 5 * want / math.sqrt(n)
    np.testing.assert_allclose(float(metrics['dp_noise_std']), want, rtol=1e-6)
    # Leaves get independent noise.
    a, b = np.asarray(mean['a']).ravel()[:20000], np.asarray(mean['b'])
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(20000)


def test_noisy_mean_is_clipped_sum_over_expected_plus_noise():
    stacked = _stacked(2)
    present = jnp.array([1, 1, 1, 0, 1, 1, 1, 1], jnp.float32)
    z, bound, m = 0.8, 1.0, 10.0
    key = jax.random.PRNGKey(7)
    mean, _ = jax.jit(dp.noisy_mean)(stacked, present, bound, z, m, key)
    clipped, _ = jax.jit(dp.clip)(stacked, bound)
    noise = jax.jit(dp.gaussian_like)(jax.tree.map(lambda x: x[0], stacked), key)
    for got, c, e in zip(jax.tree.leaves(mean), jax.tree.leaves(clipped), jax.tree.leaves(noise)):
        want = (np.tensordot(np.asarray(present, np.float64), np.asarray(c, np.float64), 1) +
                z * bound * np.asarray(e, np.float64)) / m
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_noise_split_formula():
    params = dp.make_params(1.0, 1.2, 40.0, adaptive=True, count_stddev=2.0)
    z_d = float(dp.delta_noise_multiplier(params))
    np.testing.assert_allclose(z_d**-2 + (2 * 2.0)**-2, 1.2**-2, rtol=1e-6)
    assert float(dp.delta_noise_multiplier(dp.make_params(1.0, 1.2, 40.0))) == pytest.approx(1.2)
    assert float(dp.delta_noise_multiplier(dp.make_params(1.0, 0.0, 40.0, adaptive=True))) == 0.0
    # The paper's default sigma_b = m / 20.
    assert dp.make_params(1.0, 1.0, 100.0, adaptive=True).count_stddev == 5.0


def test_adaptive_step_matches_hand_computation():
    params = dp.make_params(2.0,
                            0.0,
                            4.0,
                            adaptive=True,
                            target_quantile=0.3,
                            clip_lr=0.2,
                            count_stddev=0.0)
    norms = jnp.array([1.0, 3.0, 2.0, 0.5, 9.0, 9.0, 9.0, 9.0])
    present = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)
    new, metrics = dp.update_adaptive(dp.init_clip_state(params), norms, present, params,
                                      jax.random.PRNGKey(0))
    b = (3 - 0.5 * 4) / 4.0 + 0.5  # three of four present clients at or under S = 2
    assert float(metrics['dp_below_clip_frac']) == pytest.approx(b)
    np.testing.assert_allclose(float(new.clip_norm), 2.0 * math.exp(-0.2 * (b - 0.3)), rtol=1e-6)


def test_adaptive_clip_tracks_the_quantile():
    rng = np.random.default_rng(0)
    n = 400
    params = dp.make_params(0.1,
                            0.0,
                            float(n),
                            adaptive=True,
                            target_quantile=0.3,
                            clip_lr=0.2,
                            count_stddev=0.0)
    present = jnp.ones(n)
    step = jax.jit(lambda s, norms, k: dp.update_adaptive(s, norms, present, params, k)[0])
    state = dp.init_clip_state(params)
    for t in range(300):
        norms = jnp.asarray(rng.lognormal(0.0, 1.0, n), jnp.float32)
        state = step(state, norms, jax.random.PRNGKey(t))
    # The 0.3-quantile of lognormal(0, 1) is exp(Phi^-1(0.3)) = exp(-0.5244) = 0.592.
    assert abs(math.log(float(state.clip_norm)) - (-0.5244)) < 0.1


def test_count_noise_std():
    params = dp.make_params(1.0, 1.0, 50.0, adaptive=True, count_stddev=2.5)
    norms = jnp.zeros(C)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    b = jax.vmap(lambda k: dp.update_adaptive(dp.init_clip_state(params), norms, jnp.ones(C),
                                              params, k)[1]['dp_below_clip_frac'])(keys)
    b = np.asarray(b)
    want_sd = 2.5 / 50.0
    assert abs(b.std() / want_sd - 1) < 5 / math.sqrt(2 * b.size)
    assert abs(b.mean() - ((C * 0.5) / 50.0 + 0.5)) < 5 * want_sd / math.sqrt(b.size)


def test_private_mean_traces_once_over_values_and_counts():
    traces = []

    def fn(stacked, present, state, key, params):
        traces.append(1)
        return privacy.private_mean(stacked, present, state, key, params)

    f = jax.jit(fn)
    stacked = _stacked(4)
    rng = np.random.default_rng(0)
    state = None
    for t, (z, s) in enumerate([(0.5, 1.0), (1.5, 0.3), (0.0, 2.0)]):
        params = dp.make_params(s, z, 6.0, adaptive=True, count_stddev=1.0)
        state = privacy.init(params) if state is None else state
        present = jnp.asarray(rng.random(C) < 0.7, jnp.float32)
        mean, state, metrics = f(stacked, present, state, jax.random.PRNGKey(t), params)
        assert np.isfinite(float(state.clip_norm))
    assert len(traces) == 1


def test_validation_messages():
    """The library names its own fields (dp.clip_norm, ...); the caller's section prefixes them."""
    with pytest.raises(ValueError, match=r'^dp\.clip_norm'):
        dp.make_params(0.0, 1.0, 10.0)
    with pytest.raises(ValueError, match=r'^fed\.dp\.clip_norm'):
        dp.make_params(-1.0, 1.0, 10.0, section='fed.')
    with pytest.raises(ValueError, match=r'^dp\.clip_norm .* dp\.noise_multiplier > 0'):
        dp.make_params(math.inf, 1.0, 10.0)
    with pytest.raises(ValueError, match=r'^dp\.noise_multiplier'):
        dp.make_params(1.0, -0.1, 10.0)
    with pytest.raises(ValueError, match=r'expected clients .*fed\.num_clients'):
        dp.make_params(1.0, 1.0, 0.5, section='fed.')
    with pytest.raises(ValueError, match=r'^fed\.dp\.count_stddev .* fed\.dp\.noise_multiplier'):
        dp.make_params(1.0, 1.0, 10.0, adaptive=True, count_stddev=0.5, section='fed.')
    with pytest.raises(ValueError, match=r'^dp\.target_quantile'):
        dp.make_params(1.0, 1.0, 10.0, adaptive=True, target_quantile=1.0)


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('sec', [False, True])
def test_noise_std_on_the_production_path_with_adaptive_split(sec):
    z, sigma_b, m = 1.0, 1.2, 6.0
    params = dp.make_params(1.0, z, m, adaptive=True, count_stddev=sigma_b)
    clean = dp.make_params(1.0, 0.0, m, adaptive=True, count_stddev=sigma_b)
    z_d = float(dp.delta_noise_multiplier(params))
    assert z_d == pytest.approx((1 / z**2 - 1 / (2 * sigma_b)**2)**-0.5, rel=1e-6)  # 1.1
    state = privacy.ClipState(jnp.float32(0.37))  # S_t != S_0: the noise must follow S_t
    stacked = _stacked(5)
    present = jnp.array([1, 1, 0, 1, 1, 1, 1, 0], jnp.float32)
    sec_params = secagg.make_params(1.0, C, 32, num_params=17) if sec else None

    def noise(key):
        out, _, metrics = privacy.private_mean(stacked, present, state, key, params, sec_params)
        # Same key, z = 0: the same clipped (and quantized) sum without the noise.
        ref, _, _ = privacy.private_mean(stacked, present, state, key, clean, sec_params)
        return _flat(out) - _flat(ref), metrics['dp_noise_std']

    vals, reported = jax.jit(jax.vmap(noise))(jax.random.split(jax.random.PRNGKey(0), 2000))
    vals = np.asarray(vals, np.float64).ravel()
    n = vals.size  # 2000 keys x 17 coordinates
    want = z_d * 0.37 / m
    np.testing.assert_allclose(np.asarray(reported), want, rtol=1e-6)
    # With mean 0 known, sum(v^2) / sigma^2 ~ chi^2_n for independent N(0, sigma^2) values. The
    # two-sided 1e-6 acceptance region is about +-1.9% on the std; using z instead of z_D (10%
    # off) or S_0 instead of S_t lands far outside it, so the test can fail.
    lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], n)
    stat = np.sum(vals**2)
    assert lo < stat / want**2 < hi, (stat / want**2, lo, hi)
    assert not lo < stat / (z * 0.37 / m)**2 < hi
    assert not lo < stat / (z_d * 1.0 / m)**2 < hi
    assert abs(vals.mean()) < 5 * want / math.sqrt(n)


@pytest.mark.parametrize('mode', ['plain', 'fast', 'masked'])
@pytest.mark.parametrize('who', ['none_present', 'all_dropped'])
def test_round_without_clients_is_noise_over_expected_count(mode, who):
    params = dp.make_params(0.8, 1.3, 5.0, adaptive=True, count_stddev=2.0)
    stacked = _stacked(6)
    present = jnp.zeros(C) if who == 'none_present' else jnp.ones(C)
    survived = jnp.zeros(C)
    sec = None if mode == 'plain' else secagg.make_params(
        0.8, C, 32, num_params=17, simulate_masks=mode == 'masked')
    key = jax.random.PRNGKey(11)
    mean, state, metrics = jax.jit(privacy.private_mean)(stacked, present, privacy.init(params),
                                                         key, params, sec, None, survived)
    std = float(dp.delta_noise_multiplier(params)) * 0.8 / 5.0
    k_noise = jax.random.split(key, 3)[0]
    zero = jax.tree.map(lambda x: jnp.zeros_like(x[0]), stacked)
    want = privacy.gaussian_noise(zero, jnp.float32(std), k_noise)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
        assert np.all(np.asarray(a) != 0)  # noise only, and it is there
    assert np.isfinite(float(state.clip_norm))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics['dp_clipped_frac']) == 0.0


@pytest.mark.parametrize('sec', [False, True])
def test_metrics_split_into_covered_and_diagnostics(sec):
    assert not set(privacy.COVERED_METRICS) & set(privacy.DIAGNOSTIC_METRICS)
    assert {'dp_mean_update_norm', 'dp_clipped_frac'} <= set(privacy.DIAGNOSTIC_METRICS)
    assert {'dp_clip_norm', 'dp_noise_std', 'dp_below_clip_frac'} <= set(privacy.COVERED_METRICS)
    params = dp.make_params(0.05, 1.0, 6.0, adaptive=True, count_stddev=1.0)
    sec_params = secagg.make_params(0.05, C, 32, num_params=17) if sec else None
    present = jnp.array([1, 1, 0, 1, 1, 1, 1, 1], jnp.float32)
    run = jax.jit(privacy.private_mean)
    key = jax.random.PRNGKey(2)
    stacked = _stacked(7)  # every norm is above S = 0.05
    out = [
        run(x, present, privacy.init(params), key, params, sec_params)[2]
        for x in (stacked, jax.tree.map(lambda v: 3 * v, stacked))
    ]
    for metrics in out:
        assert set(metrics) <= set(privacy.COVERED_METRICS) | set(privacy.DIAGNOSTIC_METRICS)
    covered = [privacy.split_metrics(metrics)[0] for metrics in out]
    diagnostics = [privacy.split_metrics(metrics)[1] for metrics in out]
    # Tripling raw updates that are all clipped leaves everything inside epsilon unchanged ...
    assert covered[0].keys() == covered[1].keys()
    for name in covered[0]:
        np.testing.assert_allclose(float(covered[0][name]), float(covered[1][name]), rtol=1e-6)
    # ... while a diagnostic of the raw updates sees it.
    np.testing.assert_allclose(float(diagnostics[1]['dp_mean_update_norm']),
                               3 * float(diagnostics[0]['dp_mean_update_norm']),
                               rtol=1e-5)
    if sec:
        assert {'secagg_survived', 'secagg_dropped'} <= diagnostics[0].keys()
