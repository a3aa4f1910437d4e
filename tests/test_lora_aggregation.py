"""LoRA aggregators against numpy references on tiny shapes (the error itself: test_lora_error).

Reference: every client product, mean and SVD is formed densely in float64 numpy.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.aggregators import lora_math as la
from fedgen.lora import bytes as lora_bytes
from fedgen.aggregators import lora_rules
from fedgen.lora import ranks as lora_ranks

from helpers_lora import ALPHA, R, SHAPES
from helpers_lora import clients as _clients
from helpers_lora import factors as _np
from helpers_lora import global_tree as _global
from helpers_lora import ref_error as _ref_error


def _run(method, ad, w, g, mask=None, rng=None, residual_rank=None, state=None):
    agg = lora_rules.make(lora_rules.LoraAggregation(method, ALPHA, residual_rank))
    state = agg.init(g) if state is None else state
    m = None if mask is None else jnp.asarray(mask)
    return jax.jit(agg.aggregate)(state, g, ad, jnp.asarray(w), m, rng)


def _mean_product(ad, w, n, mask=None):
    a, b = _np(ad, n, mask)
    return np.einsum('k,kir,kro->io', w / w.sum(), a, b)


def _kernel(x):
    x = np.asarray(x, np.float64)
    return x.reshape(-1, x.shape[-1])


W = np.array([2.0, 1.0, 0.0, 5.0])


def test_avg_ab_is_weighted_mean_of_factors():
    ad, g = _clients(4, 2), _global(3)
    state, new, met = _run('avg_ab', ad, W, g)
    p = W / W.sum()
    for n in SHAPES:
        for leaf in 'ab':
            want = np.einsum('k,k...->...', p, np.asarray(ad[n][leaf], np.float64))
            np.testing.assert_allclose(new[n][leaf], want, rtol=1e-5, atol=1e-6)
    assert state['delta'] == {}
    np.testing.assert_allclose(met['lora_agg_error'], _ref_error(ad, W)[1], rtol=2e-5)
    np.testing.assert_allclose(met['lora_update_error'], met['lora_agg_error'])


def test_exact_residual_makes_the_global_model_the_mean():
    """s Abar Bbar + dW = s P after one round; after a second round dW accumulates."""
    ad, g = _clients(4, 4), _global(5)
    s = ALPHA / R
    state, new, met = _run('exact_residual', ad, W, g)
    for n in SHAPES:
        eff = s * _kernel(new[n]['a']) @ np.asarray(new[n]['b']) + _kernel(
            state['delta'][n]['kernel'])
        np.testing.assert_allclose(eff, s * _mean_product(ad, W, n), rtol=1e-5, atol=1e-5)
        assert state['delta'][n]['kernel'].shape == SHAPES[n][0] + (SHAPES[n][1], )
    assert float(met['lora_update_error']) == 0.0 and float(met['lora_agg_error']) > 0.1
    ad2 = _clients(4, 6)
    state2, new2, _ = _run('exact_residual', ad2, W, new, state=state)
    for n in SHAPES:
        a2, b2 = _np(ad2, n)
        p = W / W.sum()
        resid = _mean_product(ad2, W,
                              n) - np.einsum('k,kir->ir', p, a2) @ np.einsum('k,kro->ro', p, b2)
        np.testing.assert_allclose(_kernel(state2['delta'][n]['kernel']),
                                   _kernel(state['delta'][n]['kernel']) + s * resid,
                                   rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize('k', [1, 2])
def test_exact_residual_rank_k_is_truncated_svd(k):
    ad, g = _clients(4, 7), _global(8)
    state, new, met = _run('exact_residual', ad, W, g, residual_rank=k)
    s, p = ALPHA / R, W / W.sum()
    nums, dens = 0.0, 0.0
    for n in SHAPES:
        a, b = _np(ad, n)
        prod = _mean_product(ad, W, n)
        resid = prod - np.einsum('k,kir->ir', p, a) @ np.einsum('k,kro->ro', p, b)
        u, sv, vt = np.linalg.svd(resid)
        want = (u[:, :k] * sv[:k]) @ vt[:k]
        np.testing.assert_allclose(_kernel(state['delta'][n]['kernel']), s * want, atol=2e-5)
        nums, dens = nums + (sv[k:]**2).sum(), dens + (prod**2).sum()
    np.testing.assert_allclose(met['lora_update_error'], np.sqrt(nums / dens), rtol=1e-4)
    # A rank covering the residual's rank ((C + 2) r here) reproduces the dense residual.
    full, _, _ = _run('exact_residual', ad, W, g)
    big, _, _ = _run('exact_residual', ad, W, g, residual_rank=6)
    np.testing.assert_allclose(big['delta']['q']['kernel'], full['delta']['q']['kernel'], atol=2e-5)


@pytest.mark.parametrize('clients', [1, 4], ids=['qr', 'dense'])  # C r < min(in, out): QR path
def test_svd_refactor_is_balanced_truncated_svd(clients):
    ad, g = _clients(clients, 9), _global(10)
    w = W[:clients] if clients > 1 else np.ones(1)
    state, new, met = _run('svd_refactor', ad, w, g)
    nums, dens = 0.0, 0.0
    for n in SHAPES:
        prod = _mean_product(ad, w, n)
        u, sv, vt = np.linalg.svd(prod)
        a, b = _kernel(new[n]['a']), np.asarray(new[n]['b'], np.float64)
        np.testing.assert_allclose(a @ b, (u[:, :R] * sv[:R]) @ vt[:R], rtol=1e-4, atol=1e-4)
        # Balanced split: column j of A and row j of B both have norm sqrt(s_j).
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(sv[:R]), rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(sv[:R]), rtol=1e-4)
        nums, dens = nums + (sv[R:]**2).sum(), dens + (prod**2).sum()
    assert state['delta'] == {}
    np.testing.assert_allclose(met['lora_update_error'], np.sqrt(nums / dens), rtol=1e-3, atol=1e-6)


def test_svd_refactor_keeps_empty_directions_trainable():
    """One rank-1 client: P has rank 1, so directions 2..r keep the old A column and get B = 0."""
    ad, g = _clients(1, 11), _global(12)
    mask = np.array([[1.0, 0.0, 0.0]])
    _, new, _ = _run('svd_refactor', ad, np.ones(1), g, mask=mask)
    for n in SHAPES:
        np.testing.assert_array_equal(np.asarray(new[n]['b'])[1:], 0.0)
        np.testing.assert_array_equal(_kernel(new[n]['a'])[:, 1:], _kernel(g[n]['a'])[:, 1:])
        np.testing.assert_allclose(_kernel(new[n]['a']) @ np.asarray(new[n]['b']),
                                   _mean_product(ad, np.ones(1), n, mask),
                                   rtol=1e-4,
                                   atol=1e-5)


def test_ffa_sends_b_only_and_is_exact():
    g = _global(13)
    ad = _clients(4, 14)
    for n in SHAPES:  # every client holds the frozen global A
        ad[n]['a'] = np.repeat(np.asarray(g[n]['a'])[None], 4, axis=0)
    agg = lora_rules.make(lora_rules.LoraAggregation('ffa', ALPHA))
    sent = agg.upload(ad)
    assert all(set(v) == {'b'} for v in sent.values())
    _, new, met = _run('ffa', sent, W, g)
    for n in SHAPES:
        np.testing.assert_array_equal(new[n]['a'], g[n]['a'])
        np.testing.assert_allclose(_kernel(new[n]['a']) @ np.asarray(new[n]['b']),
                                   _mean_product(ad, W, n),
                                   atol=1e-5)
    assert float(met['lora_agg_error']) == 0.0 and float(met['lora_update_error']) == 0.0


def test_ffa_split_freezes_a():
    g = _global(25)
    frozen, train = la.split_trainable('ffa', g)
    assert all(set(v) == {'a'} for v in frozen.values())
    assert all(set(v) == {'b'} for v in train.values())
    joined = la.join_trainable(frozen, train)
    for x, y in zip(jax.tree.leaves(joined), jax.tree.leaves(g)):
        np.testing.assert_array_equal(x, y)
    mask = la.trainable_mask('ffa', g)
    assert mask['q'] == {'a': False, 'b': True}
    assert la.split_trainable('avg_ab', g)[0] == {}
    assert all(jax.tree.leaves(la.trainable_mask('stack', g)))
    # Only the trainable part is differentiated: the gradient tree holds B alone.
    loss = lambda t: sum(
        jnp.sum(jnp.square(x['a'].reshape(-1, R) @ x['b']))
        for x in la.join_trainable(frozen, t).values())
    grads = jax.grad(loss)(train)
    assert all(set(v) == {'b'} for v in grads.values())
    assert np.abs(np.asarray(grads['q']['b'])).max() > 0


def test_stack_product_is_weighted_sum_and_folds():
    ad, g = _clients(4, 15), _global(16)
    ranks = np.array([3, 1, 2, 2])
    mask = np.asarray(lora_ranks.rank_mask(jnp.asarray(ranks), R))
    st = la.stack_adapters(ad, jnp.asarray(W), jnp.asarray(mask))
    for n in SHAPES:
        assert st[n]['a'].shape == SHAPES[n][0] + (4 * R, ) and st[n]['b'].shape[0] == 4 * R
        np.testing.assert_allclose(_kernel(st[n]['a']) @ np.asarray(st[n]['b']),
                                   _mean_product(ad, W, n, mask),
                                   atol=1e-5)
        np.testing.assert_array_equal(_kernel(st[n]['a'])[:, 2 * R:3 * R], 0.0)  # absent client
        np.testing.assert_array_equal(np.asarray(st[n]['b'])[R + 1:2 * R], 0.0)  # beyond r_1 = 1
    state, new, met = _run('stack', ad, W, g, mask=mask)
    _, kept, _ = _run('stack', ad, W, g, mask=mask, rng=jax.random.PRNGKey(3))
    for n in SHAPES:
        np.testing.assert_allclose(_kernel(state['delta'][n]['kernel']),
                                   ALPHA / R * _mean_product(ad, W, n, mask),
                                   rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(new[n]['b'], 0.0)
        np.testing.assert_array_equal(new[n]['a'], g[n]['a'])
        assert np.abs(np.asarray(kept[n]['a']) - np.asarray(g[n]['a'])).max() > 0.1
    assert float(met['lora_update_error']) == 0.0


def test_hetlora_and_flexlora_with_rank_masks():
    ad, g = _clients(4, 17), _global(18)
    ranks = np.array([1, 3, 2, 1])
    mask = np.asarray(lora_ranks.rank_mask(jnp.asarray(ranks), R))
    _, het, met = _run('avg_ab', ad, W, g, mask=mask)
    want = lora_ranks.sliced_mean(lora_ranks.mask_adapters(ad, jnp.asarray(mask)), jnp.asarray(W),
                                  jnp.asarray(mask), g)
    for n in SHAPES:
        np.testing.assert_array_equal(het[n]['a'], want[n]['a'])
        q = W[:, None] * mask / (W[:, None] * mask).sum(0)
        a, _ = _np(ad, n, mask)
        np.testing.assert_allclose(_kernel(het[n]['a']), np.einsum('kr,kir->ir', q, a), atol=1e-5)
    np.testing.assert_allclose(met['lora_agg_error'], _ref_error(ad, W, mask)[1], rtol=2e-5)
    # FlexLoRA: the exact mean of the masked products, downloaded at each client's rank r_k.
    _, flex, _ = _run('svd_refactor', ad, W, g, mask=mask)
    for k, r in enumerate(ranks):
        mine = lora_ranks.mask_adapters(flex, jnp.asarray(mask[k]))
        for n in SHAPES:
            u, sv, vt = np.linalg.svd(_mean_product(ad, W, n, mask))
            np.testing.assert_allclose(_kernel(mine[n]['a']) @ np.asarray(mine[n]['b']),
                                       (u[:, :r] * sv[:r]) @ vt[:r],
                                       rtol=1e-4,
                                       atol=1e-4)


def test_no_participants_changes_nothing():
    ad, g = _clients(3, 19), _global(20)
    for method in la.METHODS:
        agg = lora_rules.make(lora_rules.LoraAggregation(method, ALPHA))
        state = agg.init(g)
        state2, new, _ = jax.jit(agg.aggregate)(state, g, ad, jnp.zeros(3))
        for x, y in zip(jax.tree.leaves((state2, new)), jax.tree.leaves((state, g))):
            np.testing.assert_array_equal(x, y)


def test_aggregate_traces_once_for_new_weights_and_ranks():
    ad, g = _clients(4, 21), _global(22)
    agg = lora_rules.make(lora_rules.LoraAggregation('svd_refactor', ALPHA))
    traces = []

    def counted(*args):
        traces.append(1)
        return agg.aggregate(*args)

    f = jax.jit(counted)
    for w, ranks in (([1, 2, 3, 4], [1, 2, 3, 3]), ([0, 5, 1, 1], [3, 3, 1, 2])):
        f(agg.init(g), g, ad, jnp.asarray(w, jnp.float32),
          lora_ranks.rank_mask(jnp.asarray(ranks), R))
    assert len(traces) == 1


def test_apply_delta_and_download():
    params = {'q': {'kernel': np.ones((10, 7), np.float32), 'bias': np.zeros(7, np.float32)}}
    delta = {'q': {'kernel': np.full((10, 7), 0.5, np.float32)}}
    out = la.apply_delta(params, delta)
    np.testing.assert_array_equal(out['q']['kernel'], 1.5)
    np.testing.assert_array_equal(out['q']['bias'], 0.0)
    with pytest.raises(ValueError, match='no kernel'):
        la.apply_delta(params, {'k': {'kernel': np.zeros((1, 1))}})
    g = _global(23)
    agg = lora_rules.make(lora_rules.LoraAggregation('exact_residual', ALPHA))
    start, dw = agg.download(agg.init(g), g)
    assert start is g and set(dw) == set(SHAPES)
    deltas = jax.tree.map(lambda x: np.ones((2, ) + x.shape, x.dtype), g)
    np.testing.assert_array_equal(la.client_adapters(g, deltas)['q']['a'][1], g['q']['a'] + 1)


def test_byte_counts():
    g = _global(24)  # q: A [10, 3], B [3, 7]; conv: A [2, 2, 3, 3], B [3, 6]; float32
    ranks = np.array([1, 3])
    per_rank = ((10 + 7) + (12 + 6)) * 4
    np.testing.assert_array_equal(lora_bytes.upload_bytes('avg_ab', g, ranks), ranks * per_rank)
    np.testing.assert_array_equal(lora_bytes.upload_bytes('ffa', g, ranks), ranks * (7 + 6) * 4)
    dense = (10 * 7 + 12 * 6) * 4
    d = lora_bytes.download_bytes('exact_residual', g, ranks)
    np.testing.assert_array_equal(d['delta_round'], [dense, dense])
    np.testing.assert_array_equal(d['total'], ranks * per_rank + dense)
    d = lora_bytes.download_bytes('exact_residual', g, ranks, residual_rank=2)
    np.testing.assert_array_equal(d['delta_round'], [2 * per_rank, 2 * per_rank])
    np.testing.assert_array_equal(d['delta_dense'], [dense, dense])
    d = lora_bytes.download_bytes('stack', g, np.array([1, 3, 2]), present=np.array([1, 1, 0]))
    np.testing.assert_array_equal(d['delta_round'], [4 * per_rank] * 3)
    # The whole population's ranks, of which a round stacks 4 clients: 4 * mean(r) = 8 slices.
    population = np.array([1, 3, 2, 2, 1, 3])
    d = lora_bytes.download_bytes('stack', g, population, round_clients=4)
    np.testing.assert_array_equal(d['delta_round'], [8 * per_rank] * 6)
    d = lora_bytes.download_bytes('svd_refactor', g, ranks)
    np.testing.assert_array_equal(d['total'], ranks * per_rank)
    assert d['delta_dense'].sum() == 0


@pytest.mark.parametrize('kwargs, field', [
    (dict(method='fedavg'), 'lora_aggregation'),
    (dict(method='exact_residual', residual_rank=0), 'residual_rank'),
    (dict(method='exact_residual', residual_rank=-2), 'residual_rank'),
    (dict(method='avg_ab', residual_rank=2), 'residual_rank'),
])
def test_refused_settings(kwargs, field):
    """The aggregation's own fields; pairings with other features: tests/test_combinations.py.
    The library names its own parameters; the caller's section prefixes them."""
    with pytest.raises(ValueError, match='^' + field):
        la.validate(**kwargs)
    with pytest.raises(ValueError, match='^fed\\.' + field):
        la.validate(**kwargs, section='fed.')


def test_accepted_settings():
    la.validate('avg_ab')
    la.validate('exact_residual', residual_rank=4)
    with pytest.raises(ValueError, match='^lora_aggregation'):
        lora_rules.LoraAggregation('avg')
    with pytest.raises(ValueError, match=r"only to fed\.lora_aggregation='exact_residual'"):
        la.validate('stack', 2, section='fed.')


CHILD = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from helpers_lora import ALPHA, R, clients as _clients, global_tree as _global
from fedgen.aggregators import lora_math as la
from fedgen.lora import ranks as lora_ranks
from fedgen.fl import mesh as population
from fedgen.aggregators import lora_rules
assert jax.device_count() == 4
mesh = population.client_mesh(4)
# One module (the dense one) keeps the 10 compiles short; the conv-shaped path is covered above.
ad, g = _clients(8, 30), _global(31)
ad, g = {'q': ad['q']}, {'q': g['q']}
w = jnp.asarray([2., 1., 0., 5., 3., 1., 1., 0.])
mask = lora_ranks.rank_mask(jnp.asarray([3, 1, 2, 3, 2, 3, 1, 2]), R)
diff = 0.0
for method in la.METHODS:
    agg = lora_rules.make(lora_rules.LoraAggregation(method, ALPHA))
    one = jax.jit(agg.aggregate)(agg.init(g), g, ad, w, mask)
    sharded = jax.jit(agg.aggregate)(agg.init(g), g, population.shard_clients(ad, mesh),
                                     population.shard_clients(w, mesh), mask)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(sharded)):
        diff = max(diff, float(np.abs(np.asarray(x) - np.asarray(y)).max()))
print(json.dumps({'diff': diff}))
'''


def test_sharded_clients_equal_one_device():
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, '-c', CHILD, here],
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])['diff'] <= 1e-5
