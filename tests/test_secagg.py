"""Simulated SecAgg: masked inputs look uniform, exact integer sums, dropout recovery, bounds."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedgen import privacy
from fedgen.privacy import dp, secagg

C, D = 10, 20_000
KEY = jax.random.PRNGKey(42)


@pytest.fixture(scope='module')
def clipped():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(C, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # norm 1: inside a clip norm S = 1
    return jnp.asarray(x * np.linspace(0.2, 0.999, C, dtype=np.float32)[:, None])


@pytest.fixture(scope='module')
def ids():
    return jnp.asarray(np.random.default_rng(1).choice(1000, C, replace=False), jnp.int32)


def _np_mod_sum(q, keep):
    return (np.asarray(q, np.uint64)[np.asarray(keep, bool)].sum(0) % 2**32).astype(np.uint32)


def test_masked_input_of_any_client_is_uniform(clipped, ids):
    scale = secagg.max_scale(1.0, C, 32)
    q = secagg.quantize(clipped, ids, scale, 32, KEY)
    y = jax.jit(secagg.mask, static_argnums=3)(q, ids, jnp.ones(C), 32, KEY)
    y = np.asarray(y)
    for k in range(C):
        for shift in (24, 0):  # top byte and bottom byte: 256 bins, ~78 values each
            p = stats.chisquare(np.bincount((y[k] >> shift) & 255, minlength=256)).pvalue
            assert p > 1e-4, (k, shift, p)
    # The test has power: the unmasked quantized values are far from uniform.
    top = (np.asarray(q)[0] >> 24) & 255
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue < 1e-12


@pytest.mark.parametrize('bits', [32, 20])
def test_unmasked_sum_is_exact(clipped, ids, bits):
    scale = secagg.max_scale(1.0, C, bits)
    q = secagg.quantize(clipped, ids, scale, bits, KEY)
    part = jnp.ones(C)
    y = secagg.mask(q, ids, part, bits, KEY)
    total = secagg.unmask(secagg.server_sum(y, part, bits), ids, part, part, bits, KEY)
    want = _np_mod_sum(q, np.ones(C)) & np.uint32(2**bits - 1)
    np.testing.assert_array_equal(np.asarray(total), want)
    # With no dropouts the pair masks cancel by themselves; only the self masks remain.
    raw = np.asarray(secagg.server_sum(y, part, bits))
    assert not np.array_equal(raw, want)


@pytest.mark.parametrize('dropped', [1, 2, 3])  # 10%, 20%, 30% of C = 10
def test_dropouts_after_masking_are_recovered_exactly(clipped, ids, dropped):
    bits = 32
    scale = secagg.max_scale(1.0, C, bits)
    part = jnp.asarray(np.arange(C) != 4, jnp.float32)  # one sampled slot is padding
    rng = np.random.default_rng(dropped)
    gone = rng.choice(np.nonzero(np.asarray(part))[0], dropped, replace=False)
    surv = np.asarray(part).copy()
    surv[gone] = 0
    surv = jnp.asarray(surv)
    q = secagg.quantize(clipped, ids, scale, bits, KEY)
    y = secagg.mask(q, ids, part, bits, KEY)
    server = secagg.server_sum(y, surv, bits)
    total = jax.jit(secagg.unmask, static_argnums=4)(server, ids, part, surv, bits, KEY)
    np.testing.assert_array_equal(np.asarray(total), _np_mod_sum(q, surv))
    # Without the dropped clients' pair seeds the survivors' sum stays masked.
    naive = secagg.unmask(server, ids, surv, surv, bits, KEY)
    assert np.mean(np.asarray(naive) == _np_mod_sum(q, surv)) < 0.01


def test_dequantized_mean_within_stated_bound(clipped, ids):
    bits, m = 32, 12.0
    part = jnp.ones(C)
    scale = float(secagg.max_scale(1.0, C, bits))
    total, metrics = secagg.secure_sum(clipped, ids, part, part, scale, bits, KEY)
    ref = np.asarray(clipped, np.float64).sum(0)
    err = np.abs(np.asarray(total, np.float64) / m - ref / m)
    bound = 1.5 * C / (scale * m) + 2.0**-23 * np.abs(ref / m)
    assert np.all(err <= bound)
    # Stochastic rounding is unbiased: the error averages out far below the worst case.
    assert abs(np.mean(np.asarray(total, np.float64) - ref)) * scale < 5 * math.sqrt(C / 4 / D)
    assert float(metrics['secagg_survived']) == C


def test_private_mean_with_secagg_equals_fedavg_within_bound():
    rng = np.random.default_rng(5)
    tree = {
        'a': jnp.asarray(rng.normal(size=(C, 6, 7)), jnp.float32) * 0.1,
        'b': jnp.asarray(rng.normal(size=(C, 9)), jnp.float32) * 0.1
    }
    present = jnp.asarray(np.arange(C) < 8, jnp.float32)
    survived = present.at[2].set(0.0)  # a dropout after masking
    params = dp.make_params(0.5, 0.0, 8.0)
    sec = secagg.make_params(0.5, C, 24, num_params=51)
    ids = jnp.arange(100, 100 + C, dtype=jnp.int32)
    run = jax.jit(privacy.private_mean)
    mean, _, metrics = run(tree, present, privacy.init(params), KEY, params, sec, ids, survived)
    # Under SecAgg every update is clipped to S' = S - 1.5 sqrt(D) / s before quantizing.
    s_prime = 0.5 - 1.5 * math.sqrt(51) / sec.scale
    np.testing.assert_allclose(float(metrics['secagg_clip_norm']), s_prime, rtol=1e-6)
    clipped, _ = dp.clip(dp.clip(tree, 0.5)[0], s_prime)
    plain = privacy.divide_by_expected(privacy.plain_sum(clipped, survived), 8.0)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(plain)):
        bound = 1.5 * 7 / (sec.scale * 8.0) + 2.0**-22 * np.abs(np.asarray(b))
        assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= bound)
    assert float(metrics['secagg_dropped']) == 1.0


def test_overflow_bound_is_tight_enough_and_enforced():
    bits, n, s_clip = 16, 5, 2.0
    scale = secagg.max_scale(s_clip, n, bits)
    secagg.overflow_check(scale, s_clip, n, bits)
    # Worst case: every client puts its whole norm on one coordinate with the same sign.
    x = np.zeros((n, 4), np.float32)
    x[:, 0], x[:, 1] = s_clip * (1 - 1e-6), -s_clip * (1 - 1e-6)
    ones = jnp.ones(n)
    ids = jnp.arange(n, dtype=jnp.int32)
    total, _ = secagg.secure_sum(jnp.asarray(x), ids, ones, ones, scale, bits, KEY)
    np.testing.assert_allclose(np.asarray(total)[:2], [n * s_clip, -n * s_clip], rtol=1e-3)
    # Twice that scale wraps around, and overflow_check refuses it.
    wrapped, _ = secagg.secure_sum(jnp.asarray(x), ids, ones, ones, 2 * scale, bits, KEY)
    assert np.asarray(wrapped)[0] < 0
    with pytest.raises(ValueError, match=r'^secagg scale .* overflows 16 bits') as err:
        secagg.overflow_check(2 * scale, s_clip, n, bits)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=r'^fed\.secagg\.bits'):
        secagg.make_params(1.0, 10, bits=40, section='fed.')
    with pytest.raises(ValueError, match=r'finite dp\.clip_norm'):
        secagg.make_params(math.inf, 10)
    with pytest.raises(ValueError, match='overflows 8 bits'):
        secagg.make_params(1.0, 100, bits=8)  # 100 clients cannot share an 8-bit ring
    with pytest.raises(ValueError, match='2\\^22'):
        secagg.overflow_check(2.0**23, 1.0, 2, 32)


@pytest.mark.parametrize('bits', [32, 12])
def test_to_signed(bits):
    vals = np.array([0, 1, 2**(bits - 1) - 1, 2**(bits - 1), 2**bits - 1], np.uint64)
    want = np.where(vals >= 2**(bits - 1), vals.astype(np.int64) - 2**bits, vals.astype(np.int64))
    got = secagg.to_signed(jnp.asarray(vals.astype(np.uint32)), bits)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_protocol_bytes_by_hand():
    out = secagg.protocol_bytes(1000, 10, bits=32)
    assert out['masked_input'] == 4000
    assert out['advertise_keys'] == 64
    assert out['share_keys'] == 9 * (64 + 8 + 28)
    assert out['unmasking'] == 9 * 36
    assert out['total'] == 4000 + 64 + 900 + 324
    assert out['overhead'] == out['total'] - 4000
    assert secagg.protocol_bytes(1001, 2, bits=20)['masked_input'] == math.ceil(1001 * 20 / 8)


def test_secure_sum_traces_once_over_dropout_patterns(clipped, ids):
    traces = []

    def fn(flat, part, surv, scale):
        traces.append(1)
        return secagg.secure_sum(flat, ids, part, surv, scale, 32, KEY)[0]

    f = jax.jit(fn)
    rng = np.random.default_rng(3)
    x = clipped[:, :64]
    for t in range(3):
        part = jnp.asarray(rng.random(C) < 0.8, jnp.float32)
        surv = part * jnp.asarray(rng.random(C) < 0.8, jnp.float32)
        scale = float(secagg.max_scale(1.0, C, 32)) / (t + 1)
        got = f(x, part, surv, scale)
        ref = np.asarray(x, np.float64)[np.asarray(surv, bool)].sum(0)
        assert np.all(np.abs(np.asarray(got) - ref) <= 1.5 * C / scale + 2.0**-23 * np.abs(ref))
    assert len(traces) == 1


@pytest.mark.parametrize('bits', [32, 20])
@pytest.mark.parametrize('pattern', ['all', 'dropouts', 'nobody', 'all_dropped'])
def test_fast_path_equals_masked_path_bit_for_bit(clipped, ids, bits, pattern):
    part = np.asarray(np.arange(C) != 4, np.float32)  # slot 4 is padding
    surv = part.copy()
    if pattern == 'all':
        part = surv = np.ones(C, np.float32)
    elif pattern == 'dropouts':
        surv[[0, 7, 9]] = 0  # dropped after masking: survived < present
    elif pattern == 'nobody':
        part = surv = np.zeros(C, np.float32)
    else:
        surv[:] = 0
    part, surv = jnp.asarray(part), jnp.asarray(surv)
    x = clipped[:, :3000]
    scale = float(secagg.max_scale(1.0, C, bits))
    fast, fast_m = secagg.secure_sum(x, ids, part, surv, scale, bits, KEY)
    masked, masked_m = secagg.secure_sum(x, ids, part, surv, scale, bits, KEY, True)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(masked))
    assert fast_m.keys() == masked_m.keys()
    q = secagg.quantize(x, ids, scale, bits, KEY)
    want = _np_mod_sum(q, np.asarray(surv) * np.asarray(part)) & np.uint32(2**bits - 1)
    np.testing.assert_array_equal(np.asarray(secagg.ring_sum(q, part, surv, bits)), want)
    # The production entry, noise included, gives the same bits on either path.
    params = dp.make_params(1.0, 0.7, 6.0)
    outs = [
        jax.jit(privacy.private_mean)({
            'w': x
        }, part, privacy.init(params), KEY, params,
                                      secagg.make_params(1.0, C, bits, simulate_masks=sim), ids,
                                      surv)[0]['w'] for sim in (False, True)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def _dequantized_norms(flat, ids, scale, bits, key):
    """||q_k / s|| in float64 from the exact integers (the update one client adds to the sum)."""
    q = secagg.to_signed(secagg.quantize(flat, ids, scale, bits, key), bits)
    return np.linalg.norm(np.asarray(q, np.float64) / scale, axis=1)


def test_quantized_update_norm_is_within_the_noise_clip_norm():
    # A coarse scale, so that the rounding margin 1.5 sqrt(D) / s is 30% of S.
    n, d, s_clip, bits = 8, 2000, 1.0, 32
    scale = 1.5 * math.sqrt(d) / (0.3 * s_clip)
    sec = secagg.make_params(s_clip, n, bits, scale=scale, num_params=d)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x *= (np.linspace(1.0, 4.0, n, dtype=np.float32) / np.linalg.norm(x, axis=1))[:, None]
    ids = jnp.arange(n, dtype=jnp.int32)
    clipped, _ = privacy.clip(jnp.asarray(x), s_clip)  # the DP clip at S: every norm >= S here
    worst, without_margin = 0.0, 0.0
    for t in range(20):
        key = jax.random.PRNGKey(t)
        # The production block alone with one survivor returns that client's q_k / s: the
        # change of the released sum when the client is added or removed.
        for k in range(n):
            one = jnp.asarray(np.arange(n) == k, jnp.float32)
            total, metrics = privacy.secure_sum(clipped, ids, jnp.ones(n), one, s_clip, sec, key)
            worst = max(worst, float(np.linalg.norm(np.asarray(total, np.float64))))
        # The same quantizer on updates clipped at S only (no margin) exceeds S.
        without_margin = max(without_margin,
                             _dequantized_norms(clipped, ids, scale, bits, key).max())
    s_prime = float(metrics['secagg_clip_norm'])
    assert s_prime == pytest.approx(0.7 * s_clip, rel=1e-5)
    assert worst <= s_clip, worst  # the sensitivity the noise z S is calibrated to
    assert without_margin > s_clip  # so the test can fail: the margin is needed


def test_adaptive_clip_norm_moves_the_scale_and_keeps_the_bound():
    n, d, s0, bits = 8, 2000, 1.0, 16
    sec = secagg.make_params(s0, n, bits, num_params=d)  # scale = max_scale(S_0)
    ratio0 = 1.5 * math.sqrt(d) / (sec.scale * s0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.arange(n, dtype=jnp.int32)
    for s_t in (s0 / 50, s0, 7 * s0):
        clipped, _ = privacy.clip(x, s_t)
        scale = float(secagg.round_scale(sec.scale, s0, s_t, n, bits))
        np.testing.assert_allclose(scale,
                                   min(sec.scale * s0 / s_t, secagg.max_scale(s_t, n, bits)),
                                   rtol=1e-6)
        # Never wraps at S_t: n (S s + 2) <= 2^(b-1) - 1, up to the float32 rounding of the
        # in-graph scale (harmless: |q| < S s + 1.5 leaves 0.5 n of slack inside the + 2).
        assert n * (s_t * scale + 2) <= (2**(bits - 1) - 1) * (1 + 1e-6)
        total, metrics = privacy.secure_sum(clipped,
                                            ids,
                                            jnp.ones(n),
                                            jnp.ones(n),
                                            s_t,
                                            sec,
                                            KEY,
                                            clip_norm_0=s0)
        assert float(metrics['secagg_scale']) == pytest.approx(scale, rel=1e-6)
        # The relative margin never exceeds its value at S_0, which make_params checked.
        assert float(metrics['secagg_clip_norm']) >= s_t * (1 - ratio0) * (1 - 1e-5)
        s_prime = float(metrics['secagg_clip_norm'])
        again, _ = privacy.clip(clipped, s_prime)
        assert _dequantized_norms(again, ids, scale, bits, KEY).max() <= s_t


def test_quantization_margin_refusals_are_one_line():
    # 10 clients at 12 bits leave S s <= 202.7 < 1.5 sqrt(40000) = 300: only more bits help.
    with pytest.raises(ValueError, match=r'fed\.secagg\.bits .*13 or more') as err:
        secagg.make_params(1.0, 10, bits=12, num_params=40_000, section='fed.')
    assert str(err.value).startswith('fed.secagg: fed.dp.clip_norm') and '\n' not in str(err.value)
    # A hand-set scale that is too coarse: raising secagg.scale helps.
    with pytest.raises(ValueError, match=r'^secagg: dp\.clip_norm .*raise secagg\.scale') as err:
        secagg.make_params(1.0, 10, bits=32, scale=100.0, num_params=10_000)
    assert '\n' not in str(err.value)
    # The same settings with a fine enough scale pass, and D = 0 skips the check.
    assert secagg.make_params(1.0, 10, bits=13, num_params=40_000).bits == 13
    assert secagg.make_params(1.0, 10, bits=32, scale=100.0).scale == 100.0
