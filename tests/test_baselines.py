"""Baselines: FedProx and Ditto on hand-checked quadratics, local-only equals clients alone, the
FedSA split never uploads B, centralized pooling keeps every example once."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ptb_fedgen_edge
from fedgen import algorithms, client, comm, lora
from fedgen.algorithms import centralized, client_state, ditto, fedavg, fedprox, fedsa, local_only
from fedgen.data.batching import RoundData

LR, MU = 0.1, 0.5


def _config(**fed):
    c = ptb_fedgen_edge.get_config('tiny')
    with c.unlocked():
        c.fed.update(client_opt='sgd', client_lr=LR, client_chunk=1, **fed)
    return c


def quadratic(variables, batch, rng):
    """L(x) = mean_b 0.5 ||x - c_b||^2 over the batch (weighted); grad = x - mean_b c_b."""
    del rng
    x, c, w = variables['lora']['x'], batch['c'], batch['weight']
    per = 0.5 * jnp.sum(jnp.square(x[None] - c), -1)
    return (per * w).sum() / w.sum(), w.sum()


def _data(cs, ids):
    """RoundData with one example per step: cs [C, S, d]."""
    cs = np.asarray(cs, np.float32)
    c, s, _ = cs.shape
    return RoundData(client_ids=np.asarray(ids, np.int32),
                     batches={
                         'c': cs[:, :, None],
                         'weight': np.ones((c, s, 1), np.float32)
                     },
                     mask=np.ones((c, s), np.float32),
                     n_k=np.ones(c, np.float32))


def test_fedprox_gradient_is_plain_gradient_plus_mu_times_drift():
    alg = fedprox.make(_config(prox_mu=MU), quadratic)
    wg = np.array([1.0, -2.0], np.float32)
    c1, c2 = np.array([3.0, 0.0]), np.array([-1.0, 4.0])
    state = alg.init({'lora': {'x': jnp.asarray(wg)}}, jax.random.PRNGKey(0))
    new, _ = jax.jit(alg.apply)(state, {}, _data([[c1, c2]], [0]))
    w1 = wg - LR * (wg - c1)  # step 1 starts at w_G: the proximal gradient is zero
    g2 = (w1 - c2) + MU * (w1 - wg)  # step 2: plain gradient + mu (w - w_G)
    np.testing.assert_allclose(np.asarray(new.trainable['lora']['x']), w1 - LR * g2, rtol=1e-6)
    plain = fedprox.make(_config(prox_mu=1e-9), quadratic)
    new0, _ = jax.jit(plain.apply)(plain.init(state.trainable, state.rng), {}, _data([[c1, c2]],
                                                                                     [0]))
    assert np.abs(np.asarray(new0.trainable['lora']['x'] - new.trainable['lora']['x'])).max() > 5e-3
    with pytest.raises(ValueError, match='fed.prox_mu'):
        fedprox.make(_config(prox_mu=0.0), quadratic)


def test_ditto_personal_update_follows_its_objective():
    lam = 0.3
    cfg = _config(ditto_lambda=lam, num_clients=3)
    alg = ditto.make(cfg, quadratic)
    wg = np.array([1.0, -2.0], np.float32)
    state = alg.init({'lora': {'x': jnp.asarray(wg)}}, jax.random.PRNGKey(0))
    v = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 2.0]], np.float32)
    state = state.replace(clients={'lora': {'x': jnp.asarray(v)}})
    c = np.array([[[3.0, 0.0]], [[-1.0, 4.0]]], np.float32)  # clients 2 and 0, one step each
    new, _ = jax.jit(alg.apply)(state, {}, _data(c, [2, 0]))
    got = np.asarray(new.clients['lora']['x'])
    for row, k in enumerate((2, 0)):
        # v <- v - lr (grad L_k(v) + lambda (v - w_G^t))
        expect = v[k] - LR * ((v[k] - c[row, 0]) + lam * (v[k] - wg))
        np.testing.assert_allclose(got[k], expect, rtol=1e-6)
    np.testing.assert_array_equal(got[1], v[1])  # not sampled: unchanged
    w_k = wg - LR * (wg - c[:, 0])  # the global part is plain FedAvg from w_G
    np.testing.assert_allclose(np.asarray(new.trainable['lora']['x']), w_k.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match='fed.ditto_lambda'):
        ditto.make(_config(), quadratic)


def test_local_only_equals_training_each_client_alone(tiny):
    cfg = _config(num_clients=6)
    with cfg.unlocked():
        cfg.fed.update(client_opt='adam', client_lr=1e-2, client_chunk=2)
    alg = local_only.make(cfg, tiny.loss_fn)
    w = {'lora': tiny.adapters}
    frozen = {'params': tiny.params}
    state = alg.init(w, jax.random.PRNGKey(0))
    apply = jax.jit(alg.apply)
    rounds = ([1, 4], [1, 2])
    datas = [tiny.round_data(ids, r) for r, ids in enumerate(rounds)]
    for d in datas:
        state, _ = apply(state, frozen, d)
    update = jax.jit(client.make_local_update(tiny.loss_fn, optax.adam(1e-2)))

    def alone(k):
        v = w
        for d, ids in zip(datas, rounds):
            if k in ids:
                i = ids.index(k)
                one = {'batches': jax.tree.map(lambda x: x[i], d.batches), 'mask': d.mask[i]}
                v = update(frozen, v, one, jax.random.PRNGKey(0)).params
        return v

    for k in (1, 2, 4, 0):
        for a, b in zip(jax.tree.leaves(alone(k)), jax.tree.leaves(state.clients)):
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(state.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing is federated
    assert comm.round_cost(alg.upload, w, 2).up_round == 0


def test_fedsa_never_uploads_local_blocks(tiny):
    cfg = _config(num_clients=6)
    with cfg.unlocked():
        cfg.fed.update(client_opt='adam', client_lr=1e-2, client_chunk=2)
    alg = fedsa.make(cfg, tiny.loss_fn)
    w = {'lora': tiny.adapters}
    flat = jax.tree_util.tree_flatten_with_path(w)[0]
    a_bytes = sum(x.size * 4 for p, x in flat if p[-1].key == 'a')
    assert 0 < a_bytes < lora.num_bytes(w)
    assert comm.round_cost(alg.upload, w, 3).up_per_client == a_bytes
    sent = alg.upload(w)
    assert all(p[-1].key == 'a' for p, _ in jax.tree_util.tree_flatten_with_path(sent)[0])
    state = alg.init(w, jax.random.PRNGKey(0))
    apply = jax.jit(alg.apply)
    for r, ids in enumerate(([1, 4], [1, 2])):
        state, _ = apply(state, {'params': tiny.params}, tiny.round_data(ids, r))
    b_glob = client_state.split(state.trainable, {'b'})[1]
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(b_glob))
    b_rows = np.stack([
        np.abs(np.asarray(x)).reshape(6, -1).max(1) for x in jax.tree.leaves(state.clients)
    ]).max(0)
    assert (b_rows[[1, 2, 4]] > 0).all() and (b_rows[[0, 3, 5]] == 0).all()
    a0 = client_state.split(w, {'b'})[0]
    a1 = client_state.split(state.trainable, {'b'})[0]
    assert max(
        np.abs(np.asarray(x) - np.asarray(y)).max()
        for x, y in zip(jax.tree.leaves(a0), jax.tree.leaves(a1))) > 0  # A is federated
    pers = fedsa.personal(state)
    assert jax.tree.leaves(pers)[0].shape[0] == 6


def test_centralized_pools_every_real_example_once():
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 1000, (2, 3, 2, 1)).astype(np.int32)
    weight = np.ones((2, 3, 2), np.float32)
    weight[1, 2] = 0  # client 1's last step is padding
    out = centralized.pool_round({'tokens': tok, 'weight': weight}, jax.random.PRNGKey(0))
    w = np.asarray(out['batches']['weight'])
    got = np.sort(np.asarray(out['batches']['tokens'])[w > 0].ravel())
    np.testing.assert_array_equal(got, np.sort(tok[weight > 0].ravel()))
    np.testing.assert_array_equal(np.asarray(out['mask']), [1, 1, 1, 1, 1, 0])


def test_every_method_is_registered():
    for name in algorithms.METHODS:
        m = algorithms.get(name)
        assert callable(m.variables) and callable(m.make)
    assert fedavg.ServerState is ditto.fedavg.ServerState
