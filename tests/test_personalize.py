"""Personalization: one map over all clients; the global tree is untouched; E_p = 0 is global."""
import jax
import numpy as np
import optax
import pytest

from fedgen import client, evaluation, personalize
from fedgen.data import batching, partition


@pytest.fixture(scope='module')
def split(tiny):
    return partition.local_split(tiny.clients, 0.3, 0)


TX = optax.adam(1e-2)


def _run(tiny, split, epochs, w):
    train, test = split
    return personalize.personalize(tiny.loss_fn,
                                   TX, {'params': tiny.params},
                                   w,
                                   tiny.pool,
                                   train,
                                   test,
                                   epochs=epochs,
                                   batch_size=4,
                                   seed=0,
                                   chunk=4,
                                   eval_batch_size=3)


def test_zero_epochs_gives_the_global_metric_exactly(tiny, split):
    w = {'lora': tiny.adapters}
    res = _run(tiny, split, 0, w)
    ok = np.isfinite(res.global_loss)
    np.testing.assert_array_equal(res.personal_loss[ok], res.global_loss[ok])
    # and that metric is each client's own test loss, computed independently per client
    for k, idx in enumerate(split[1]):
        if len(idx) == 0:
            assert np.isnan(res.global_loss[k]) and res.test_weight[k] == 0
            continue
        b = batching.batch_all({'tokens': tiny.pool['tokens'][idx]}, 5)
        ref, wt = evaluation.dataset_loss(tiny.loss_fn, {
            'params': tiny.params,
            **w
        }, b, jax.random.PRNGKey(0))
        np.testing.assert_allclose(res.global_loss[k], float(ref), rtol=1e-5)
        assert res.test_weight[k] == float(wt) == len(idx) * 8


def test_personalization_never_changes_the_global_adapter(tiny, split):
    w = {'lora': tiny.adapters}
    before = jax.tree.map(np.array, w)
    res = _run(tiny, split, 1, w)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(w)):
        np.testing.assert_array_equal(a, np.asarray(b))
    base = _run(tiny, split, 0, w)
    np.testing.assert_array_equal(res.global_loss, base.global_loss)
    moved = [
        np.abs(np.asarray(p) - np.asarray(g)[None]).max()
        for p, g in zip(jax.tree.leaves(res.personal), jax.tree.leaves(w))
    ]
    assert max(moved) > 1e-4  # the personal adapters did train
    assert jax.tree.leaves(res.personal)[0].shape[0] == len(tiny.clients)


def test_each_client_is_fine_tuned_as_if_alone(tiny, split):
    train, _ = split
    w = {'lora': tiny.adapters}
    res = _run(tiny, split, 1, w)
    steps = batching.num_local_steps([len(i) for i in train], 4, 1)
    data = batching.pack_clients(tiny.pool, train, np.arange(len(train)), 0,
                                 personalize.PERSONALIZE_ROUND, 4, 1, steps)
    update = jax.jit(client.make_local_update(tiny.loss_fn, TX))
    for k in (1, 4):
        one = {'batches': jax.tree.map(lambda x: x[k], data.batches), 'mask': data.mask[k]}
        ref = update({'params': tiny.params}, w, one, jax.random.PRNGKey(k))
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(res.personal)):
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a), rtol=1e-4, atol=1e-6)
    # every client trained (all have local train data), so each reports a finite loss
    assert np.isfinite(res.train_loss).all()


def test_pack_eval_pads_with_zero_weight():
    ex = {'x': np.arange(10)[:, None]}
    out = personalize.pack_eval(ex, [np.array([1, 2, 3]), np.array([], np.int64)], 2)
    assert out['x'].shape == (2, 2, 2, 1)
    np.testing.assert_array_equal(out['weight'][0].ravel(), [1, 1, 1, 0])
    np.testing.assert_array_equal(out['x'][0].ravel()[:3], [1, 2, 3])
    assert out['weight'][1].sum() == 0
    with pytest.raises(ValueError, match='eval.batch_size'):
        personalize.pack_eval(ex, [np.array([1])], 0)


def test_gain_summary_by_hand():
    s = personalize.gain_summary(np.array([3.0, 2.0, 1.0, np.nan]), np.array([1.0, 2.0, 3.0, 1.0]))
    assert s['clients'] == 3 and s['share_improved'] == pytest.approx(1 / 3)
    assert s['median_gain'] == 0.0 and s['p10_gain'] == pytest.approx(-1.6)
    assert s['mean_global'] == pytest.approx(2.0)
