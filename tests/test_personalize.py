"""Personalization: one map over all clients; the global tree is untouched; E_p = 0 is global;
the backbone reference; methods without a global model; the summary's columns by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chex

from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import personalization as personalize
from fedgen.data import batching, partition
from fedgen.metrics import dataset_loss


@pytest.fixture(scope='module')
def split(tiny):
    return partition.local_split(tiny.clients, 0.3, 0)


TX = optax.adam(1e-2)


def _run(tiny, split, epochs, w, **kw):
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
                                   eval_batch_size=3,
                                   **kw)


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
        ref, wt = dataset_loss.dataset_loss(tiny.loss_fn, {
            'params': tiny.params,
            **w
        }, b, jax.random.PRNGKey(0))
        np.testing.assert_allclose(res.global_loss[k], float(ref), rtol=1e-5)
        assert res.test_weight[k] == float(wt) == len(idx) * 8


def test_personalization_never_changes_the_global_adapter(tiny, split):
    w = {'lora': tiny.adapters}
    before = jax.tree.map(np.array, w)
    res = _run(tiny, split, 1, w)
    chex.assert_trees_all_equal(before, w)
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
        chex.assert_trees_all_close(client_state.gather(res.personal, k),
                                    ref.params,
                                    rtol=1e-4,
                                    atol=1e-6)
    # every client trained (all have local train data), so each reports a finite loss
    assert np.isfinite(res.train_loss).all()


def test_a_subset_of_clients_gets_their_rows_of_the_whole_population(tiny, split):
    """clients=[...]: row i is client clients[i]'s row of the run over every client (same
    batches, keys and noise), fine-tuned or kept; bad ids are refused before any compute."""
    w = {'lora': tiny.adapters}
    whole = _run(tiny, split, 1, w)
    ids = [4, 1]
    part = _run(tiny, split, 1, w, clients=ids)
    for f in ('backbone_loss', 'global_loss', 'personal_loss', 'test_weight', 'train_loss'):
        np.testing.assert_allclose(getattr(part, f), getattr(whole, f)[ids], rtol=1e-6)
    chex.assert_trees_all_close(part.personal,
                                jax.tree.map(lambda x: x[np.array(ids)], whole.personal),
                                rtol=1e-5,
                                atol=1e-7)
    kept = jax.tree.map(
        lambda x: x + jnp.arange(len(tiny.clients), dtype=x.dtype).reshape((-1, ) + (1, ) *
                                                                           (x.ndim - 1)),
        client_state.tile(w, len(tiny.clients)))
    part = _run(tiny, split, 1, w, personal=kept, clients=[3])
    chex.assert_trees_all_equal(part.personal, jax.tree.map(lambda x: x[3:4], kept))
    for bad in ([], [1, 1], [len(tiny.clients)], [-1]):
        with pytest.raises(ValueError, match=r'^personalize: clients must be distinct ids'):
            _run(tiny, split, 1, w, clients=bad)


def test_pack_eval_pads_with_zero_weight():
    ex = {'x': np.arange(10)[:, None]}
    out = personalize.pack_eval(ex, [np.array([1, 2, 3]), np.array([], np.int64)], 2)
    assert out['x'].shape == (2, 2, 2, 1)
    np.testing.assert_array_equal(out['weight'][0].ravel(), [1, 1, 1, 0])
    np.testing.assert_array_equal(out['x'][0].ravel()[:3], [1, 2, 3])
    assert out['weight'][1].sum() == 0
    with pytest.raises(ValueError, match='^batch_size must be an int >= 1'):
        personalize.pack_eval(ex, [np.array([1])], 0)


def test_backbone_reference_and_methods_without_a_global_model(tiny, split):
    w = {'lora': tiny.adapters}  # B = 0: the global model is the backbone exactly
    res = _run(tiny, split, 0, w, backbone={'params': tiny.params})
    ok = np.isfinite(res.global_loss)
    assert ok.sum() >= 4
    np.testing.assert_array_equal(res.backbone_loss[ok], res.global_loss[ok])
    moved = jax.tree.map(lambda a: a + 0.1, w)
    kept = client_state.tile(moved, len(tiny.clients))
    res = _run(tiny, split, 1, w, personal=kept, has_global=False)
    assert np.isnan(res.global_loss).all() and not res.finetuned
    assert np.isnan(res.train_loss).all()  # kept trees: no fine-tuning ran
    chex.assert_trees_all_equal(res.personal, kept)
    assert (res.personal_loss[ok] != res.backbone_loss[ok]).all()
    with pytest.raises(ValueError, match='no global model'):
        _run(tiny, split, 1, w, has_global=False)


def test_moved_rows():
    init = {'a': jnp.zeros((4, 2, 3)), 'b': jnp.ones((4, 5))}
    now = {'a': init['a'].at[2, 1, 0].set(1e-7), 'b': init['b'].at[0, 4].set(2.0)}
    np.testing.assert_array_equal(personalize.moved_rows(now, init), [True, False, True, False])


def test_gain_summary_by_hand():
    s = personalize.gain_summary(np.array([3.0, 2.0, 1.0, np.nan]), np.array([1.0, 2.0, 3.0, 1.0]))
    assert s['clients'] == 3 and s['share_improved'] == pytest.approx(1 / 3)
    assert s['median_gain'] == 0.0 and s['p10_gain'] == pytest.approx(-1.6)
    assert s['mean_reference'] == pytest.approx(2.0) and s['mean_personal'] == pytest.approx(2.0)
    s = personalize.gain_summary(np.array([3.0, 2.0, 1.0]),
                                 np.array([1.0, 2.0, 3.0]),
                                 include=np.array([True, False, False]))
    assert s['clients'] == 1 and s['share_improved'] == 1.0 and s['median_gain'] == 2.0


def _personalized(b, g, p, finetuned):
    n = len(b)
    return personalize.Personalized({}, np.array(b), np.array(g), np.array(p), np.ones(n),
                                    np.full(n, np.nan), finetuned)


def test_summary_columns_mean_one_thing():
    nan = float('nan')
    trained = np.array([True, True, False, True])
    # A method that keeps trees, with no global model: client 2 was never trained (initial
    # tree), so it is left out of the shares; client 3 has no test data.
    res = _personalized([4.0, 4.0, 4.0, nan], [nan] * 4, [3.0, 5.0, 4.0, nan], False)
    s = personalize.summary(lambda x: x, res, trained, kept=True, epochs=1)
    assert s['personal_source'] == 'kept' and s['finetune_epochs'] is None
    assert s['vs_global'] is None and s['mean_global'] is None and not s['has_global']
    assert s['clients_tested'] == 3 and s['clients_trained'] == 2
    assert s['vs_backbone']['clients'] == 2 and s['vs_backbone']['share_improved'] == 0.5
    assert s['mean_backbone'] == pytest.approx(4.0) and s['mean_personal'] == pytest.approx(4.0)
    # A fine-tuned global model: every tested client counts, and both references apply.
    res = _personalized([4.0, 4.0, 4.0, nan], [3.5, 3.0, 5.0, nan], [3.0, 3.5, 4.0, nan], True)
    s = personalize.summary(np.exp, res, trained, kept=False, epochs=2)
    assert s['personal_source'] == 'finetuned' and s['finetune_epochs'] == 2
    assert s['vs_global']['clients'] == 3 and s['vs_global']['share_improved'] == pytest.approx(
        2 / 3)
    assert s['vs_backbone']['share_improved'] == pytest.approx(2 / 3)
    assert s['mean_global'] == pytest.approx(np.mean(np.exp([3.5, 3.0, 5.0])))
    res = _personalized([4.0], [3.0], [3.0], False)
    s = personalize.summary(np.exp, res, np.array([False]), kept=False, epochs=2)
    assert s['personal_source'] == 'global' and s['finetune_epochs'] is None
