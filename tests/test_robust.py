"""Robust aggregators against numpy/scipy references, absent clients, breakdown, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedgen.aggregators import robust

RNG = np.random.default_rng(0)


def _tree(c, rng=RNG):
    return {
        'a': rng.normal(size=(c, 3, 2)).astype(np.float32),
        'b': rng.normal(size=(c, 4)).astype(np.float32)
    }


def _flat(tree):
    return np.concatenate(
        [np.asarray(tree[k]).reshape(np.asarray(tree[k]).shape[0], -1) for k in sorted(tree)],
        axis=1)


def _unflat(v, like):
    out, i = {}, 0
    for k in sorted(like):
        size = int(np.prod(like[k].shape[1:]))
        out[k] = v[i:i + size].reshape(like[k].shape[1:])
        i += size
    return out


def _reduce(name, tree, w, **hp):
    return jax.jit(lambda t, w: robust.reduce(name, t, w, **hp))(tree, jnp.asarray(w))


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol)


# numpy references, written from the definitions --------------------------------------------


def np_krum(v, w, f, m):
    n = len(v)
    d = ((v[:, None] - v[None])**2).sum(-1)
    k = max(n - f - 2, 1)
    scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)]
    sel = np.argsort(scores, kind='stable')[:(m if m > 0 else n - f)]
    return (w[sel, None] * v[sel]).sum(0) / w[sel].sum(), sel


def np_weiszfeld(v, w, iters, nu):
    z = (w[:, None] * v).sum(0) / w.sum()
    for _ in range(iters):
        b = w / np.maximum(nu, np.linalg.norm(v - z, axis=1))
        z = (b[:, None] * v).sum(0) / b.sum()
    return z


def test_mean_median_trimmed_against_numpy():
    tree, w = _tree(7), np.array([3, 1, 4, 1, 5, 9, 2], np.float32)
    v = _flat(tree)
    got, met = _reduce('mean', tree, w)
    _assert_tree_close(got, _unflat((w[:, None] * v).sum(0) / w.sum(), tree))
    assert float(met['num_present']) == 7
    got, _ = _reduce('median', tree, w)
    _assert_tree_close(got, _unflat(np.median(v, axis=0), tree))
    got, met = _reduce('trimmed_mean', tree, w, beta=0.3)  # floor(0.3 * 7) = 2 per side
    assert int(met['trimmed_per_side']) == 2
    _assert_tree_close(got, _unflat(stats.trim_mean(v, 0.3, axis=0), tree))


def test_median_even_count_averages_middles():
    x = {'x': jnp.array([[1.0], [7.0], [3.0], [100.0]])}
    got, _ = _reduce('median', x, np.ones(4))
    assert float(got['x'][0]) == 5.0


def test_norm_bound_median_and_fixed():
    tree, w = _tree(5), np.array([1, 2, 3, 4, 5], np.float32)
    v = _flat(tree)
    v[2] *= 50.0  # one large update
    tree = _unflat_stacked(v, tree)
    norms = np.linalg.norm(v, axis=1)
    for bound, tau in ((0.0, np.median(norms)), (0.7, 0.7)):
        clipped = v * np.minimum(1.0, tau / norms)[:, None]
        want = (w[:, None] * clipped).sum(0) / w.sum()
        got, met = _reduce('norm_bound', tree, w, bound=bound)
        _assert_tree_close(got, _unflat(want, tree))
        np.testing.assert_allclose(float(met['clip_bound']), tau, rtol=1e-6)
        np.testing.assert_allclose(float(met['clipped_frac']), (norms > tau).mean())


def _unflat_stacked(v, like):
    out, i = {}, 0
    for k in sorted(like):
        size = int(np.prod(like[k].shape[1:]))
        out[k] = v[:, i:i + size].reshape(like[k].shape)
        i += size
    return out


@pytest.mark.parametrize('f,m', [(1, 0), (1, 1), (2, 3)])
def test_multi_krum_against_numpy(f, m):
    tree, w = _tree(8), np.arange(1, 9).astype(np.float32)
    v = _flat(tree)
    want, sel = np_krum(v, w, f, m)
    got, met = _reduce('multi_krum', tree, w, f=f, m=m)
    _assert_tree_close(got, _unflat(want, tree))
    mask = np.zeros(8, np.float32)
    mask[sel] = 1
    np.testing.assert_array_equal(met['selected'], mask)


def test_geometric_median_against_numpy_and_1d_median():
    tree, w = _tree(6), np.array([1, 1, 2, 3, 1, 2], np.float32)
    v = _flat(tree)
    got, _ = _reduce('geometric_median', tree, w, iters=5, nu=1e-6)
    _assert_tree_close(got,
                       _unflat(np_weiszfeld(v.astype(np.float64), w, 5, 1e-6), tree),
                       rtol=1e-4,
                       atol=1e-5)
    # In 1-D the geometric median is the (weighted) median: points 0, 1, 10 -> 1.
    x = {'x': jnp.array([[0.0], [1.0], [10.0]])}
    got, met = _reduce('geometric_median', x, np.ones(3), iters=200, nu=1e-8)
    np.testing.assert_allclose(float(got['x'][0]), 1.0, atol=1e-4)
    np.testing.assert_allclose(float(met['gm_objective']), 10.0 / 3, rtol=1e-4)  # (1 + 0 + 9) / 3


@pytest.mark.parametrize('name', robust.NAMES)
def test_absent_clients_are_ignored(name):
    """Padding/dropped/non-finite clients (w = 0) holding NaN, inf or huge values change nothing."""
    tree, w = _tree(5), np.array([2, 1, 3, 1, 2], np.float32)
    hp = dict(beta=0.2, f=1, m=0, iters=3)
    want, _ = _reduce(name, tree, w, **hp)
    junk = {
        k:
        np.concatenate([
            v[:2],
            np.full((1, ) + v.shape[1:], np.nan, np.float32), v[2:4],
            np.full((2, ) + v.shape[1:], 1e30, np.float32), v[4:]
        ])
        for k, v in tree.items()
    }
    junk['a'][6, 0, 0] = np.inf
    jw = np.array([2, 1, 0, 3, 1, 0, 0, 2], np.float32)
    got, met = _reduce(name, junk, jw, **hp)
    assert float(met['num_present']) == 5
    _assert_tree_close(got, {k: np.asarray(v) for k, v in want.items()}, rtol=2e-6, atol=1e-6)


def test_no_recompile_when_weights_change():
    traces = []

    @jax.jit
    def f(t, w):
        traces.append(1)
        return robust.reduce('trimmed_mean', t, w, beta=0.25)

    tree = _tree(6)
    for w in ([1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]):
        f(tree, jnp.asarray(w, jnp.float32))
    assert len(traces) == 1


def test_nobody_present_gives_zeros():
    tree = _tree(3)
    for name in robust.NAMES:
        got, _ = _reduce(name, tree, np.zeros(3, np.float32))
        for leaf in jax.tree.leaves(got):
            np.testing.assert_array_equal(leaf, 0.0)


def _attack(num_bad, c=9, value=1e6):
    honest = RNG.normal(loc=1.0, scale=0.1, size=(c, 20)).astype(np.float32)
    honest[:num_bad] = value
    return {'x': honest}, honest[num_bad:]


def test_breakdown_median_resists_up_to_half_mean_none():
    # 4 of 9 attackers: the median stays inside the honest range; the mean is dragged away.
    tree, good = _attack(4)
    w = np.ones(9, np.float32)
    med, _ = _reduce('median', tree, w)
    assert np.all(np.asarray(med['x']) >= good.min(0)) and np.all(med['x'] <= good.max(0))
    mean, _ = _reduce('mean', tree, w)
    assert np.all(np.asarray(mean['x']) > 1e5)
    # A single attacker already breaks the mean.
    tree1, _ = _attack(1)
    mean1, _ = _reduce('mean', tree1, w)
    assert np.all(np.asarray(mean1['x']) > 1e5 / 9 - 1)
    # 5 of 9 (a majority) breaks the median too: the bound is tight.
    tree5, _ = _attack(5)
    med5, _ = _reduce('median', tree5, w)
    assert np.all(np.asarray(med5['x']) == 1e6)


@pytest.mark.parametrize('name,hp', [('trimmed_mean', dict(beta=0.34)), ('norm_bound', dict()),
                                     ('multi_krum', dict(f=2)),
                                     ('geometric_median', dict(iters=50, nu=1e-6))])
def test_robust_aggregators_resist_a_minority(name, hp):
    tree, good = _attack(2)
    got, _ = _reduce(name, tree, np.ones(9, np.float32), **hp)
    err = np.abs(np.asarray(got['x']) - good.mean(0)).max()
    assert err < 1.0, (name, err)  # the mean would be off by 2e5


def test_finite_mask():
    tree = _tree(4)
    tree['a'][1, 0, 1] = np.nan
    tree['b'][3, 2] = -np.inf
    np.testing.assert_array_equal(robust.finite_mask(tree), [True, False, True, False])


@pytest.mark.parametrize('args,kw,field', [
    (('mediam', 10), {}, 'aggregator'),
    (('median', 10, 0.5), {}, 'attack.fraction'),
    (('trimmed_mean', 10), dict(beta=0.5), 'robust.beta'),
    (('multi_krum', 6), dict(f=2), 'robust.f'),
    (('multi_krum', 10), dict(f=1, m=10), 'robust.m'),
    (('norm_bound', 10), dict(bound=-1.0), 'robust.bound'),
    (('geometric_median', 10), dict(iters=0), 'robust.iters'),
    (('geometric_median', 10), dict(nu=0.0), 'robust.nu'),
    (('mean', 10), dict(gamma=1), 'robust'),
])
def test_check(args, kw, field):
    """The library names its own parameters; a caller's section prefixes every name."""
    with pytest.raises(ValueError, match='^' + field.replace('.', r'\.')) as e:
        robust.check(*args, **kw)
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='^fed\\.' + field.replace('.', r'\.')):
        robust.check(*args, section='fed.', **kw)


def test_section_prefixes_both_fields():
    with pytest.raises(ValueError) as e:
        robust.check('median', 10, 0.5, section='fed.')
    assert 'fed.attack.fraction' in str(e.value) and 'fed.aggregator=median' in str(e.value)
    with pytest.raises(ValueError, match=r'^aggregator must be one of'):
        robust.reduce('mediam', {'a': np.ones((2, 3))}, np.ones(2))


def test_check_accepts_valid():
    robust.check('median', 10, 0.4)
    robust.check('trimmed_mean', 10, 0.3, beta=0.3)
    robust.check('multi_krum', 7, 0.2, f=2, m=0)  # 7 > 2*2 + 2
    robust.check('geometric_median', 3, iters=2, nu=1e-5)
