"""Heterogeneous LoRA ranks as a rank mask: parsing, zero gradients, rank-r_k equivalence inside an
r_max program (one trace), HetLoRA per-slice means vs numpy, byte counts at the true ranks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen.lora import ranks as lora_ranks
from fedgen.models import layers

R_MAX, ALPHA, D_IN, D_OUT = 8, 16.0, 6, 5


def test_client_ranks_cycle_and_uniform():
    np.testing.assert_array_equal(lora_ranks.client_ranks([2, 4, 8], 7, 8, 0),
                                  [2, 4, 8, 2, 4, 8, 2])
    np.testing.assert_array_equal(lora_ranks.client_ranks('2,4', 3, 8, 0), [2, 4, 2])
    np.testing.assert_array_equal(lora_ranks.client_ranks('cycle:8', 2, 8, 0), [8, 8])
    u = lora_ranks.client_ranks('uniform:2,4,8', 300, 8, seed=1)
    assert set(u.tolist()) == {2, 4, 8} and u.dtype == np.int32
    np.testing.assert_array_equal(u, lora_ranks.client_ranks('uniform:2,4,8', 300, 8, seed=1))
    assert not np.array_equal(u, lora_ranks.client_ranks('uniform:2,4,8', 300, 8, seed=2))
    # Each rank is drawn with probability 1/3: 300 draws land within 5 sigma (sigma = 8.2).
    assert all(abs((u == r).sum() - 100) < 41 for r in (2, 4, 8))


@pytest.mark.parametrize('spec', [[2, 9], 'uniform:4,16', [0], [2.5], 'gauss:2,4', '', 'a,b'])
def test_client_ranks_refused(spec):
    """The library names its own fields; the caller's section prefixes them."""
    with pytest.raises(ValueError, match=r'^client_ranks'):
        lora_ranks.client_ranks(spec, 4, 8, 0)
    with pytest.raises(ValueError, match=r'^lora\.client_ranks'):
        lora_ranks.client_ranks(spec, 4, 8, 0, section='lora.')


def test_client_ranks_section_prefixes_both_fields():
    with pytest.raises(ValueError, match=r'^lora\.client_ranks: .*\[1, lora\.rank=8\]'):
        lora_ranks.client_ranks([2, 9], 4, 8, 0, section='lora.')
    with pytest.raises(ValueError, match=r'^num_clients must be >= 1'):
        lora_ranks.client_ranks([2], 0, 8, 0, section='lora.')


def test_rank_mask_and_mask_adapters():
    m = lora_ranks.rank_mask(jnp.array([2, 8, 0]), 8)
    np.testing.assert_array_equal(m, np.arange(8)[None] < np.array([2, 8, 0])[:, None])
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 2, D_IN, 8)).astype(np.float32)  # conv-shaped A
    b = rng.normal(size=(3, 8, D_OUT)).astype(np.float32)
    out = lora_ranks.mask_adapters({'m': {'a': a, 'b': b}, 'bias': b}, m)
    mm = np.asarray(m)
    np.testing.assert_array_equal(out['m']['a'], a * mm[:, None, None, None, :])
    np.testing.assert_array_equal(out['m']['b'], b * mm[:, :, None])
    np.testing.assert_array_equal(out['bias'], b)
    one = lora_ranks.mask_adapters({'a': a[0], 'b': b[0]}, m[0])  # one client, mask [r]
    np.testing.assert_array_equal(one['a'], out['m']['a'][0])
    np.testing.assert_array_equal(one['b'], out['m']['b'][0])
    # Layer-stacked module (L = 4): A [C, L, in, r], B [C, L, r, out]; every layer masked alike.
    sa = rng.normal(size=(3, 4, D_IN, 8)).astype(np.float32)
    sb = rng.normal(size=(3, 4, 8, D_OUT)).astype(np.float32)
    st = lora_ranks.mask_adapters({'a': sa, 'b': sb}, m)
    np.testing.assert_array_equal(st['a'], sa * mm[:, None, None, :])
    np.testing.assert_array_equal(st['b'], sb * mm[:, None, :, None])
    one = lora_ranks.mask_adapters({'a': sa[1], 'b': sb[1]}, m[1])
    np.testing.assert_array_equal(one['b'], st['b'][1])


class Tiny(nn.Module):
    """Two adapted Dense layers (fedgen's LoRA layer) with a nonlinearity between them."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(layers.Dense(D_IN, lora_alpha=self.alpha, name='d0')(x))
        return layers.Dense(D_OUT, lora_alpha=self.alpha, name='d1')(h)

    alpha: float = ALPHA


@pytest.fixture(scope='module')
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, D_IN)), jnp.float32)  # [C, S, B, in]
    y = jnp.asarray(rng.normal(size=(3, 5, 4, D_OUT)), jnp.float32)
    params = Tiny().init(jax.random.PRNGKey(0), x[0, 0])['params']
    # r_max adapters whose B is non-zero too (as after a round), so A gets gradient at step 1.
    ad = {
        n: {
            'a': jnp.asarray(rng.normal(size=(D_IN, R_MAX)) / 3, jnp.float32),
            'b': jnp.asarray(rng.normal(size=(R_MAX, o)) / 3, jnp.float32)
        }
        for n, o in (('d0', D_IN), ('d1', D_OUT))
    }
    return params, ad, x, y


def _trainer(alpha, tx, masked):
    model = Tiny(alpha=alpha)

    def loss(ad, params, x, y, mask):
        if masked:
            ad = lora_ranks.mask_adapters(ad, mask)
        return jnp.mean(jnp.square(model.apply({'params': params, 'lora': ad}, x) - y))

    def train(params, ad, x, y, mask):

        def step(carry, xy):
            w, st = carry
            g = jax.grad(loss)(w, params, *xy, mask)
            u, st = tx.update(g, st, w)
            return (optax.apply_updates(w, u), st), None

        (w, _), _ = jax.lax.scan(step, (ad, tx.init(ad)), (x, y))
        return w

    return train


def test_masked_slots_get_exactly_zero_gradient(problem):
    params, ad, x, y = problem
    model = Tiny()
    mask = lora_ranks.rank_mask(jnp.array(3), R_MAX)
    loss = lambda w: jnp.mean(
        jnp.square(
            model.apply({
                'params': params,
                'lora': lora_ranks.mask_adapters(w, mask)
            }, x[0, 0]) - y[0, 0]))
    g = jax.jit(jax.grad(loss))(ad)
    for n in ('d0', 'd1'):
        assert np.all(np.asarray(g[n]['a'])[:, 3:] == 0) and np.all(np.asarray(g[n]['b'])[3:] == 0)
        assert np.abs(np.asarray(g[n]['a'])[:, :3]).min() > 0
        assert np.abs(np.asarray(g[n]['b'])[:3]).min() > 0


@pytest.mark.parametrize('tx', [optax.sgd(0.05), optax.adam(1e-2)], ids=['sgd', 'adam'])
def test_rank_k_client_inside_r_max_program_equals_rank_k_program(problem, tx):
    """Clients of ranks (2, 5, 8) trained in ONE vmapped r_max = 8 program (scale alpha / 8) give
    what a separate rank-r_k program gives with alpha_k = alpha r_k / 8 (the same scale: see the
    module docstring), and their slots beyond r_k never move. Traced once for any ranks.
    Equal to float32 rounding: the batched r_max matmuls round differently in the last bit."""
    params, ad, x, y = problem
    ranks = jnp.array([2, 5, 8])
    traces = []

    def counted(*args):
        traces.append(1)
        return _trainer(ALPHA, tx, True)(*args)

    program = jax.jit(jax.vmap(counted, in_axes=(None, None, 0, 0, 0)))
    out = program(params, ad, x, y, lora_ranks.rank_mask(ranks, R_MAX))
    program(params, ad, x, y, lora_ranks.rank_mask(jnp.array([1, 7, 3]), R_MAX))
    assert len(traces) == 1
    for k, r in enumerate(np.asarray(ranks)):
        small = {n: {'a': v['a'][:, :r], 'b': v['b'][:r]} for n, v in ad.items()}
        ref = jax.jit(_trainer(ALPHA * r / R_MAX, tx, False))(params, small, x[k], y[k], None)
        for n in ('d0', 'd1'):
            got_a, got_b = np.asarray(out[n]['a'][k]), np.asarray(out[n]['b'][k])
            np.testing.assert_allclose(got_a[:, :r], ref[n]['a'], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got_b[:r], ref[n]['b'], rtol=1e-6, atol=1e-7)
            # The training moved the owned slots, and never the others.
            assert np.abs(got_a[:, :r] - np.asarray(ad[n]['a'][:, :r])).max() > 1e-3
            np.testing.assert_array_equal(got_a[:, r:], ad[n]['a'][:, r:])
            np.testing.assert_array_equal(got_b[r:], ad[n]['b'][r:])


def test_sliced_mean_matches_numpy():
    rng = np.random.default_rng(1)
    c, r = 4, 4
    a = rng.normal(size=(c, 3, r)).astype(np.float32)
    b = rng.normal(size=(c, r, 2)).astype(np.float32)
    w = np.array([1.0, 3.0, 0.0, 2.0], np.float32)
    ranks = np.array([1, 2, 4, 2])  # slices 2, 3 are owned only by the absent client
    mask = lora_ranks.rank_mask(jnp.asarray(ranks), r)
    prev = {'a': rng.normal(size=(3, r)).astype(np.float32), 'b': np.zeros((r, 2), np.float32)}
    got = lora_ranks.sliced_mean({'a': a, 'b': b}, jnp.asarray(w), mask, prev)
    want_a, want_b = prev['a'].copy(), prev['b'].copy()
    for j in range(r):
        own = [k for k in range(c) if ranks[k] > j and w[k] > 0]
        if own:
            q = w[own] / w[own].sum()
            want_a[:, j] = sum(qi * a[k][:, j] for qi, k in zip(q, own))
            want_b[j] = sum(qi * b[k][j] for qi, k in zip(q, own))
    np.testing.assert_allclose(got['a'], want_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got['b'], want_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got['a'][:, 2:], prev['a'][:, 2:])
    # Layer-stacked B [C, L, r, out]: each layer's mean is the unstacked mean of that layer.
    sb = np.stack([b, 2 * b + 1], axis=1)
    prev_s = {'a': prev['a'], 'b': np.stack([prev['b'], prev['b'] + 1])}
    got_s = lora_ranks.sliced_mean({'a': a, 'b': sb}, jnp.asarray(w), mask, prev_s)
    for layer in range(2):
        one = lora_ranks.sliced_mean({
            'a': a,
            'b': sb[:, layer]
        }, jnp.asarray(w), mask, {
            'a': prev['a'],
            'b': prev_s['b'][layer]
        })
        np.testing.assert_allclose(got_s['b'][layer], one['b'], rtol=1e-6, atol=1e-6)
    q, owned = lora_ranks.slice_weights(jnp.asarray(w), mask)
    np.testing.assert_array_equal(owned, [True, True, False, False])
    np.testing.assert_allclose(np.asarray(q)[:, 1], [0, 3 / 5, 0, 2 / 5], rtol=1e-6)


def test_rank_bytes_count_true_ranks():
    ad = {
        'q': {
            'a': jnp.zeros((16, 8)),
            'b': jnp.zeros((8, 12))
        },
        'c': {
            'a': jnp.zeros((3, 3, 4, 8), jnp.bfloat16),
            'b': jnp.zeros((8, 5), jnp.bfloat16)
        }
    }
    ad['s'] = {'a': jnp.zeros((3, 16, 8)), 'b': jnp.zeros((3, 8, 12))}  # 3 stacked layers
    ranks = np.array([2, 8])
    per_rank = (16 + 12) * 4 + (3 * 3 * 4 + 5) * 2 + 3 * (16 + 12) * 4
    np.testing.assert_array_equal(lora_ranks.rank_bytes(ad, ranks), ranks * per_rank)
    np.testing.assert_array_equal(lora_ranks.rank_bytes(ad, ranks, ('b', )),
                                  ranks * (12 * 4 + 5 * 2 + 3 * 12 * 4))
    assert lora_ranks.adapter_rank(ad) == 8
