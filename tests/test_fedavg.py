"""FedAvg/FedGen-Edge rounds: aggregation, frozen backbone, trace-once, server optimizers."""
import jax
import numpy as np

from fedgen import aggregate, client
from fedgen.algorithms import fedavg


def test_round_is_weighted_mean_of_client_updates(tiny):
    alg = tiny.algorithm(chunk=2)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    data = tiny.round_data([1, 3, 4])
    new, metrics = jax.jit(alg.apply)(state, {'params': tiny.params}, data)
    res = fedavg.run_clients(client.make_local_update(tiny.loss_fn,
                                                      __import__('optax').adam(1e-2)),
                             state, {'params': tiny.params},
                             data,
                             chunk=3)
    n = np.array([len(tiny.clients[i]) for i in (1, 3, 4)], np.float32)
    for g, d, w0 in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(res.delta),
                        jax.tree.leaves(state.trainable)):
        expect = np.asarray(w0) + np.tensordot(n / n.sum(), np.asarray(d), axes=1)
        np.testing.assert_allclose(np.asarray(g), expect, atol=1e-6)
    assert int(new.round) == 1 and np.isfinite(float(metrics['train_loss']))


def test_traces_once_across_rounds_with_different_clients(tiny):
    alg = tiny.algorithm(chunk=2)
    traces = []

    def counted(state, frozen, data):
        traces.append(1)
        return alg.apply(state, frozen, data)

    apply = jax.jit(counted)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    for rnd, ids in enumerate(([0, 1, 2], [3, 4, 5], [1, 3, 5], [0, 2, 4])):
        data = tiny.round_data(ids, rnd)
        state, _ = apply(state, {'params': tiny.params}, data)
    assert len(traces) == 1
    assert int(state.round) == 4


def test_learning_reduces_loss(tiny):
    alg = tiny.algorithm(chunk=3, server='adam')
    apply = jax.jit(alg.apply)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    losses = []
    for rnd in range(6):
        state, m = apply(state, {'params': tiny.params}, tiny.round_data([0, 1, 2, 3, 4, 5], rnd))
        losses.append(float(m['train_loss']))
    assert losses[-1] < losses[0]


def test_zero_weight_padding_clients_do_not_move_the_model(tiny):
    from fedgen.data import batching
    alg = tiny.algorithm(chunk=4)
    state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(0))
    data = tiny.round_data([4, 5])
    padded = batching.pad_clients(data, 4)
    a, _ = jax.jit(alg.apply)(state, {'params': tiny.params}, data)
    b, _ = jax.jit(alg.apply)(state, {'params': tiny.params}, padded)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert aggregate.weighted_mean({'x': np.zeros((2, 1))}, np.zeros(2))['x'].shape == (1, )
