"""The federated engine (FedAvg / FedGen-Edge): a round equals the n_k-weighted mean of looped
single-client updates, a numpy hand computation of FedAvg with SGD, trace-once, padding clients,
pooling for centralized training, and the global loss going down under training."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen import algorithms
from fedgen.fl import local_update as client
from fedgen.fl import engine
from fedgen.data import batching
from fedgen.data.batching import RoundData
from fedgen.metrics import dataset_loss


def _one(data: RoundData, i: int) -> dict:
    """Client row i of a round as the single-client input of client.make_local_update."""
    return {'batches': jax.tree.map(lambda x: x[i], data.batches), 'mask': data.mask[i]}


def test_round_is_weighted_mean_of_looped_single_client_updates(tiny):
    alg = tiny.algorithm(chunk=2)
    rng = jax.random.PRNGKey(0)
    w0 = {'lora': tiny.adapters}
    frozen = {'params': tiny.params}
    ids = [1, 3, 4]
    data = tiny.round_data(ids)
    new, metrics = jax.jit(alg.apply)(alg.init(w0, rng), frozen, data)
    # The reference: each client alone (one jitted single-client update, called in a Python loop),
    # its key fold_in(fold_in(rng, round=0), id), then the n_k-weighted mean in numpy.
    update = jax.jit(client.make_local_update(tiny.loss_fn, optax.adam(1e-2)))
    res = [
        update(frozen, w0, _one(data, i), jax.random.fold_in(jax.random.fold_in(rng, 0), k))
        for i, k in enumerate(ids)
    ]
    n = np.array([len(tiny.clients[k]) for k in ids], np.float64)
    expect = jax.tree.map(
        lambda w, *d: np.asarray(w, np.float64) + sum(n[i] * np.asarray(x, np.float64)
                                                      for i, x in enumerate(d)) / n.sum(), w0,
        *[r.delta for r in res])
    chex.assert_trees_all_close(new.trainable, expect, atol=1e-6, rtol=1e-5)
    moved = max(
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(w0)))
    assert moved > 1e-3  # the comparison is not vacuous
    loss = sum(float(r.loss_sum) for r in res) / sum(float(r.weight) for r in res)
    norms = [np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(r.delta))) for r in res]
    np.testing.assert_allclose(float(metrics['train_loss']), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['delta_norm']), np.mean(norms), rtol=1e-5)
    assert float(metrics['clients_used']) == float(metrics['clients_sampled']) == 3
    assert int(new.round) == 1


def quadratic(variables, batch, rng):
    """L(x) = mean_b 0.5 ||x - c_b||^2 (weighted); grad = x - mean_b c_b.

    The trainable collection is 'w', not 'lora': x is no LoRA adapter."""
    del rng
    x, c, w = variables['w']['x'], batch['c'], batch['weight']
    per = 0.5 * jnp.sum(jnp.square(x[None] - c), -1)
    return (per * w).sum() / w.sum(), w.sum()


def test_fedavg_with_sgd_by_hand():
    """Two clients, SGD(lr) on quadratics, masked third step for client 1, server sgd(eta):
    w' = w + eta sum_k n_k (w_k - w) / sum n_k, every number computed in numpy."""
    lr, eta = 0.1, 0.5
    p = algorithms.MethodParams('fedgen_edge', 5, optax.sgd(lr), optax.sgd(eta), chunk=1)
    alg = algorithms.make(p, quadratic)
    w = np.array([1.0, -2.0], np.float32)
    c = np.array([[[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]], [[-1.0, 4.0], [2.0, 2.0], [9.0, 9.0]]],
                 np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    n_k = np.array([30.0, 10.0], np.float32)
    data = RoundData(client_ids=np.array([4, 2], np.int32),
                     batches={
                         'c': c[:, :, None],
                         'weight': np.ones((2, 3, 1), np.float32)
                     },
                     mask=mask,
                     n_k=n_k)
    new, m = jax.jit(alg.apply)(alg.init({'w': {'x': w}}, jax.random.PRNGKey(0)), {}, data)
    ends, losses = [], []
    for k in range(2):
        x = w.astype(np.float64)
        for s in range(3):
            if mask[k, s]:
                losses.append(0.5 * np.sum((x - c[k, s])**2))
                x = x - lr * (x - c[k, s])
        ends.append(x)
    avg = (n_k[0] * (ends[0] - w) + n_k[1] * (ends[1] - w)) / n_k.sum()
    np.testing.assert_allclose(np.asarray(new.trainable['w']['x']), w + eta * avg, rtol=1e-6)
    np.testing.assert_allclose(float(m['train_loss']), np.mean(losses), rtol=1e-6)


def test_traces_once_across_rounds_with_different_clients(tiny):
    alg = tiny.algorithm(chunk=2)
    traces = []

    def counted(state, frozen, data):
        traces.append(1)
        return alg.apply(state, frozen, data)

    apply = jax.jit(counted)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    for rnd, ids in enumerate(([0, 1, 2], [3, 4, 5], [1, 3, 5], [0, 2, 4])):
        state, _ = apply(state, {'params': tiny.params}, tiny.round_data(ids, rnd))
    assert len(traces) == 1
    assert int(state.round) == 4


def test_training_lowers_the_global_loss_on_the_clients_data(tiny):
    """The deterministic loss of the global model on every client example (not the noisy
    per-round train loss) falls after every round. The tokens are uniform random, so the
    learnable part (the clients' empirical unigram and bigram frequencies) is small: ~0.5% of the
    loss in 8 rounds."""
    alg = tiny.algorithm(chunk=3, server='adam')
    apply = jax.jit(alg.apply)
    frozen = {'params': tiny.params}
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    batches = batching.batch_all(tiny.pool, 20)
    loss = jax.jit(lambda w: dataset_loss.dataset_loss(tiny.loss_fn, {
        **frozen,
        **w
    }, batches, jax.random.PRNGKey(0))[0])
    curve = [float(loss(state.trainable))]
    for rnd in range(8):
        state, _ = apply(state, frozen, tiny.round_data([0, 1, 2, 3, 4, 5], rnd))
        curve.append(float(loss(state.trainable)))
    curve = np.array(curve)
    assert (np.diff(curve) < 0).all(), curve
    assert curve[-1] < curve[0] - 0.01, curve


def test_zero_weight_padding_clients_do_not_move_the_model(tiny):
    alg = tiny.algorithm(chunk=4)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    data = tiny.round_data([4, 5])
    padded = batching.pad_clients(data, 4)
    assert padded.n_k.shape == (4, ) and padded.n_k[2:].sum() == 0
    apply = jax.jit(alg.apply)
    (a, ma), (b, mb) = apply(state, {'params': tiny.params},
                             data), apply(state, {'params': tiny.params}, padded)
    chex.assert_trees_all_close(a.trainable, b.trainable, atol=1e-6)
    np.testing.assert_allclose(float(ma['train_loss']), float(mb['train_loss']), rtol=1e-6)
    assert float(mb['clients_sampled']) == float(mb['clients_used']) == 2


def test_centralized_pools_every_real_example_once():
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 1000, (2, 3, 2, 1)).astype(np.int32)
    weight = np.ones((2, 3, 2), np.float32)
    weight[1, 2] = 0  # client 1's last step is padding
    out = engine.pool_round({'tokens': tok, 'weight': weight}, jax.random.PRNGKey(0))
    w = np.asarray(out['batches']['weight'])
    got = np.sort(np.asarray(out['batches']['tokens'])[w > 0].ravel())
    np.testing.assert_array_equal(got, np.sort(tok[weight > 0].ravel()))
    np.testing.assert_array_equal(np.asarray(out['mask']), [1, 1, 1, 1, 1, 0])
