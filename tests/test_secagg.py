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
    sec = secagg.make_params(0.5, C, 24)
    ids = jnp.arange(100, 100 + C, dtype=jnp.int32)
    run = jax.jit(privacy.private_mean)
    mean, _, metrics = run(tree, present, privacy.init(params), KEY, params, sec, ids, survived)
    plain, _, _ = run(tree, present, privacy.init(params), KEY, params, None, ids, survived)
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
    with pytest.raises(ValueError, match='fed.secagg scale .* overflows 16 bits') as err:
        secagg.overflow_check(2 * scale, s_clip, n, bits)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match='fed.secagg.bits'):
        secagg.make_params(1.0, 10, bits=40)
    with pytest.raises(ValueError, match='fed.dp.clip_norm'):
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
