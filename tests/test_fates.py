"""Client fates: per-id determinism, rates, straggler step masks, over-selection, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.fl import fates


def _key(rnd=0):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), rnd), 7)


def test_fate_depends_only_on_key_and_id():
    rates = fates.FateRates.of(0.4, 0.5, 0.2)
    a = fates.draw(_key(), jnp.array([7, 3, 11]), rates)
    b = fates.draw(_key(), jnp.array([1, 11, 9, 7]), rates)
    assert float(a.report[0]) == float(b.report[3]) and float(a.report[2]) == float(b.report[1])
    assert float(a.step_frac[0]) == float(b.step_frac[3])
    assert float(a.step_frac[2]) == float(b.step_frac[1])
    # Another round draws other fates for the same ids.
    ids = jnp.arange(200)
    r0, r1 = fates.draw(_key(0), ids, rates), fates.draw(_key(1), ids, rates)
    assert not np.array_equal(r0.report, r1.report)


def test_zero_rates_mean_everyone_reports_in_full():
    f = fates.draw(_key(), jnp.arange(50), fates.FateRates.of(0.0, 0.0, 0.3))
    np.testing.assert_array_equal(f.report, np.ones(50, np.float32))
    np.testing.assert_array_equal(f.step_frac, np.ones(50, np.float32))
    assert f.report.dtype == jnp.float32 and f.step_frac.dtype == jnp.float32


def test_empirical_rates_and_fraction_range():
    n, drop, strag, lo = 20000, 0.3, 0.25, 0.4
    f = fates.draw(_key(3), jnp.arange(n), fates.FateRates.of(drop, strag, lo))
    report, frac = np.asarray(f.report), np.asarray(f.step_frac)
    assert set(np.unique(report)) <= {0.0, 1.0}
    # Binomial: 4 standard deviations.
    assert abs((1 - report.mean()) - drop) < 4 * np.sqrt(drop * (1 - drop) / n)
    slow = frac < 1.0
    assert abs(slow.mean() - strag) < 4 * np.sqrt(strag * (1 - strag) / n)
    assert frac.min() >= lo and frac.max() <= 1.0
    # Straggler fractions are uniform on [lo, 1): mean (lo + 1) / 2, sd (1 - lo) / sqrt(12).
    sd = (1 - lo) / np.sqrt(12) / np.sqrt(slow.sum())
    assert abs(frac[slow].mean() - (lo + 1) / 2) < 4 * sd
    # Dropout and straggling are independent draws.
    both = ((report == 0) & slow).mean()
    assert abs(both - drop * strag) < 4 * np.sqrt(drop * strag / n)


def test_rates_are_traced_no_recompile():
    traces = []

    @jax.jit
    def f(key, ids, rates):
        traces.append(1)
        return fates.draw(key, ids, rates)

    ids = jnp.arange(64)
    outs = [
        f(_key(r), ids, fates.FateRates.of(d, s, m))
        for r, (d, s, m) in enumerate([(0.0, 0.0, 1.0), (0.5, 0.2, 0.1), (0.9, 0.9, 0.5)])
    ]
    assert len(traces) == 1
    assert float(outs[0].report.mean()) == 1.0 and float(outs[2].report.mean()) < 0.5


def test_apply_steps_hand_example():
    mask = jnp.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 0, 1, 1, 0, 1],  # non-contiguous real steps: S_k = 4
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1]
        ],
        jnp.float32)
    frac = jnp.array([0.5, 0.5, 0.25, 0.5, 1.0])
    want = np.array(
        [
            [1, 1, 0, 0, 0, 0],  # ceil(0.5 * 4) = 2
            [1, 0, 1, 0, 0, 0],  # the first 2 real steps
            [1, 0, 0, 0, 0, 0],  # ceil(0.25 * 3) = 1
            [0, 0, 0, 0, 0, 0],  # padding client stays empty
            [1, 1, 1, 1, 1, 1]
        ],
        np.float32)
    got = fates.apply_steps(mask, frac)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == mask.dtype


def test_apply_steps_keeps_at_least_one_step_and_never_adds():
    rng = np.random.default_rng(0)
    mask = jnp.asarray((rng.random((40, 9)) < 0.6).astype(np.float32))
    frac = jnp.asarray(rng.uniform(0.01, 1.0, 40).astype(np.float32))
    got = np.asarray(fates.apply_steps(mask, frac))
    real = np.asarray(mask).sum(1)
    assert np.all(got <= np.asarray(mask))
    np.testing.assert_array_equal(got.sum(1), np.ceil(np.asarray(frac) * real))
    assert np.all(got.sum(1)[real > 0] >= 1)


def test_over_select():
    assert fates.over_select(10, 0.0) == 10
    assert fates.over_select(10, 0.1) == 11
    assert fates.over_select(10, 0.15) == 12
    assert fates.over_select(3, 0.5) == 5
    assert fates.over_select(100, 0.2) == 120


@pytest.mark.parametrize('args,field', [
    ((1.0, 0.0, 0.5, 0.0), 'fed.dropout_rate'),
    ((-0.1, 0.0, 0.5, 0.0), 'fed.dropout_rate'),
    ((0.0, 1.5, 0.5, 0.0), 'fed.straggler_rate'),
    ((0.0, float('nan'), 0.5, 0.0), 'fed.straggler_rate'),
    ((0.0, 0.2, 0.0, 0.0), 'fed.straggler_min_frac'),
    ((0.0, 0.2, 1.1, 0.0), 'fed.straggler_min_frac'),
    ((0.0, 0.0, 0.5, -0.2), 'fed.over_select'),
    ((0.0, 0.0, 0.5, 1.0), 'fed.over_select'),
])
def test_check_rates(args, field):
    """The library names its own fields; the caller's section prefixes them."""
    own = field.removeprefix('fed.')
    with pytest.raises(ValueError, match='^' + own) as e:
        fates.check_rates(*args)
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='^' + field.replace('.', r'\.')):
        fates.check_rates(*args, section='fed.')
    fates.check_rates(0.0, 0.0, 1.0, 0.0)
    fates.check_rates(0.5, 0.99, 0.1, 0.2)
