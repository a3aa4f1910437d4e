"""Every method is a small module over the shared round primitives: FedProx and Ditto on
hand-checked quadratics, local-only equals clients alone, FedSA never sends B, centralized is one
SGD chain over the pooled examples, and apply is the server half after the client half."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen import algorithms
from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import comm
from fedgen.fl import engine
from fedgen.fl.algorithm import Algorithm, ServerState
from fedgen.data.batching import RoundData
from experiments import translate

LR, MU = 0.1, 0.5
SPEC = algorithms.LoraSpec(rank=2, alpha=16.0, targets=('attn', ))


def params(name, client_tx=None, **kw):
    kw.setdefault('num_clients', 6)
    return algorithms.MethodParams(name=name,
                                   client_tx=client_tx or optax.sgd(LR),
                                   server_tx=optax.sgd(1.0),
                                   lora=SPEC,
                                   **kw)


def quadratic(variables, batch, rng):
    """L(x) = mean_b 0.5 ||x - c_b||^2 over the batch (weighted); grad = x - mean_b c_b.

    The trainable collection is 'w', not 'lora': x is no LoRA adapter."""
    del rng
    x, c, w = variables['w']['x'], batch['c'], batch['weight']
    per = 0.5 * jnp.sum(jnp.square(x[None] - c), -1)
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0), w.sum()


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
    alg = algorithms.make(params('fedprox', prox_mu=MU), quadratic)
    wg = np.array([1.0, -2.0], np.float32)
    c1, c2 = np.array([3.0, 0.0]), np.array([-1.0, 4.0])
    state = alg.init({'w': {'x': jnp.asarray(wg)}}, jax.random.PRNGKey(0))
    new, _ = jax.jit(alg.apply)(state, {}, _data([[c1, c2]], [0]))
    w1 = wg - LR * (wg - c1)  # step 1 starts at w_G: the proximal gradient is zero
    g2 = (w1 - c2) + MU * (w1 - wg)  # step 2: plain gradient + mu (w - w_G)
    np.testing.assert_allclose(np.asarray(new.trainable['w']['x']), w1 - LR * g2, rtol=1e-6)
    plain = algorithms.make(params('fedgen_edge'), quadratic)
    new0, _ = jax.jit(plain.apply)(plain.init(state.trainable, state.rng), {}, _data([[c1, c2]],
                                                                                     [0]))
    np.testing.assert_allclose(np.asarray(new0.trainable['w']['x']), w1 - LR * (w1 - c2), rtol=1e-6)
    with pytest.raises(ValueError, match='^prox_mu must be > 0 for fedprox'):
        params('fedprox', prox_mu=0.0)


def test_ditto_personal_update_follows_its_objective():
    lam = 0.3
    alg = algorithms.make(params('ditto', ditto_lambda=lam, num_clients=3), quadratic)
    wg = np.array([1.0, -2.0], np.float32)
    state = alg.init({'w': {'x': jnp.asarray(wg)}}, jax.random.PRNGKey(0))
    v = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 2.0]], np.float32)
    state = state.replace(clients={'w': {'x': jnp.asarray(v)}})
    c = np.array([[[3.0, 0.0]], [[-1.0, 4.0]]], np.float32)  # clients 2 and 0, one step each
    new, _ = jax.jit(alg.apply)(state, {}, _data(c, [2, 0]))
    got = np.asarray(new.clients['w']['x'])
    for row, k in enumerate((2, 0)):
        # v <- v - lr (grad L_k(v) + lambda (v - w_G^t))
        expect = v[k] - LR * ((v[k] - c[row, 0]) + lam * (v[k] - wg))
        np.testing.assert_allclose(got[k], expect, rtol=1e-6)
    np.testing.assert_array_equal(got[1], v[1])  # not sampled: unchanged
    w_k = wg - LR * (wg - c[:, 0])  # the global part is plain FedAvg from w_G
    np.testing.assert_allclose(np.asarray(new.trainable['w']['x']), w_k.mean(0), rtol=1e-6)
    chex.assert_trees_all_equal(alg.personal(new), new.clients)
    with pytest.raises(ValueError, match='^ditto_lambda must be > 0 for ditto'):
        params('ditto')


def test_centralized_is_one_sgd_chain_over_the_pooled_examples():
    """The round's real examples, pooled and shuffled by engine.pool_round with the key
    fold_in(fold_in(rng, round), 0), trained as one sequential SGD chain; the server adds it."""
    alg = algorithms.make(params('centralized'), quadratic)
    rng = jax.random.PRNGKey(4)
    w = np.array([1.0, -2.0], np.float32)
    c = np.random.default_rng(0).normal(size=(3, 2, 2)).astype(np.float32) * 3
    data = _data(c, [5, 1, 2])
    mask = np.ones((3, 2), np.float32)
    mask[2, 1] = 0  # client 2's second step is padding: its example never enters the pool
    weight = np.ones((3, 2, 1), np.float32)
    weight[2, 1] = 0
    data = data.replace(mask=mask, batches={'c': data.batches['c'], 'weight': weight})
    state = alg.init({'w': {'x': w}}, rng)
    state = state.replace(round=jnp.int32(3))
    new, m = jax.jit(alg.apply)(state, {}, data)
    key = jax.random.fold_in(jax.random.fold_in(rng, 3), 0)
    pooled = engine.pool_round(data.batches, key)
    order = np.asarray(pooled['batches']['c'])[:, 0]  # [C*S, d], B = 1
    real = np.asarray(pooled['mask']) > 0
    assert real.sum() == 5
    np.testing.assert_array_equal(np.sort(order[real], 0), np.sort(c[mask > 0], 0))
    x, losses = w.astype(np.float64), []
    for ck in order[real]:
        losses.append(0.5 * np.sum((x - ck)**2))
        x = x - LR * (x - ck)
    np.testing.assert_allclose(np.asarray(new.trainable['w']['x']), x, rtol=1e-6)
    np.testing.assert_allclose(float(m['train_loss']), np.mean(losses), rtol=1e-6)
    assert int(new.round) == 4 and new.clients == {}


def test_local_only_equals_training_each_client_alone(tiny):
    alg = algorithms.make(params('local_only', optax.adam(1e-2), chunk=2), tiny.loss_fn)
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
        for r, (d, ids) in enumerate(zip(datas, rounds)):
            if k in ids:
                i = ids.index(k)
                one = {'batches': jax.tree.map(lambda x: x[i], d.batches), 'mask': d.mask[i]}
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), r), k)
                v = update(frozen, v, one, key).params
        return v

    for k in (1, 2, 4, 0):
        chex.assert_trees_all_close(client_state.gather(state.clients, k),
                                    alone(k),
                                    rtol=1e-4,
                                    atol=1e-6)
    chex.assert_trees_all_equal(state.trainable, w)  # nothing is federated
    cost = comm.round_cost(alg, w, 2)
    assert cost.up_round == cost.down_round == 0


def test_fedsa_never_sends_local_blocks(tiny):
    alg = algorithms.make(params('fedsa', optax.adam(1e-2), chunk=2), tiny.loss_fn)
    w = {'lora': tiny.adapters}
    shared, local = client_state.split(w, {'b'})
    a_bytes = comm.num_bytes(shared)
    assert 0 < a_bytes < comm.num_bytes(w) and comm.num_bytes(local) > 0
    cost = comm.round_cost(alg, w, 3)
    assert cost.up_per_client == cost.down_per_client == a_bytes
    for sent in (alg.upload(w), alg.download(w)):
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
    a1 = client_state.split(state.trainable, {'b'})[0]
    assert max(
        np.abs(np.asarray(x) - np.asarray(y)).max()
        for x, y in zip(jax.tree.leaves(shared), jax.tree.leaves(a1))) > 0  # A is federated
    # Client k's personal tree: the global A with its own B.
    pers = alg.personal(state)
    for k in (0, 2):
        a_k, b_k = client_state.split(client_state.gather(pers, k), {'b'})
        chex.assert_trees_all_equal(a_k, a1)
        chex.assert_trees_all_equal(b_k, client_state.gather(state.clients, k))


# The module that implements each method, and whether it keeps per-client trees.
MODULES = {
    'fedgen_edge': 'fedavg',
    'fedavg_full': 'fedavg',
    'fedprox': 'fedavg',
    'ditto': 'ditto',
    'fedsa': 'fedsa',
    'local_only': 'local_only',
    'centralized': 'centralized',
}
EXTRA = {'fedprox': dict(prox_mu=MU), 'ditto': dict(ditto_lambda=0.3)}


@pytest.mark.parametrize('name', algorithms.METHODS)
def test_each_method_is_its_own_module(name, monkeypatch):
    p = params(name, **EXTRA.get(name, {}))
    module = getattr(algorithms, MODULES[name])
    built = []
    original = module.make
    monkeypatch.setattr(module, 'make', lambda *a, **k: built.append(name) or original(*a, **k))
    alg = algorithms.make(p, quadratic)
    assert built == [name]
    assert isinstance(alg, Algorithm)
    assert (alg.personal is not None) == (name in ('ditto', 'fedsa', 'local_only'))
    assert alg.has_global == (name not in ('fedsa', 'local_only'))
    assert (alg.server_phase is None) == (name == 'centralized')
    assert p.full_model == (name == 'fedavg_full')
    state = alg.init({'w': {'x': jnp.ones(2)}}, jax.random.PRNGKey(0))
    assert isinstance(state, ServerState)
    data = _data([[[0.0, 1.0]], [[2.0, 3.0]]], [0, 3])
    new, m = jax.jit(alg.apply)(state, {}, data)
    assert int(new.round) == 1 and np.isfinite(float(m['train_loss']))
    moved = not np.array_equal(np.asarray(new.trainable['w']['x']), np.ones(2))
    assert moved == (name != 'local_only')  # local-only has no global update
    if alg.server_phase is not None:  # apply is exactly the server half after the client half
        split = alg.server_phase(state, data, alg.client_phase(state, {}, data))
        chex.assert_trees_all_close(jax.jit(lambda s: split)(state), (new, m), rtol=1e-6)


def test_variables_split_frozen_and_trainable(tiny):
    lora_p = params('fedgen_edge')
    frozen, trainable = algorithms.variables(lora_p, tiny.params, jax.random.PRNGKey(0))
    assert list(frozen) == ['params'] and list(trainable) == ['lora']
    assert all(
        np.all(np.asarray(b) == 0) for b in jax.tree.leaves(
            client_state.split(trainable, {'b'})[1]))  # round 0 starts at the backbone
    full = params('fedprox', prox_mu=MU, prox_target='full')
    frozen, trainable = algorithms.variables(full, tiny.params, jax.random.PRNGKey(0))
    assert frozen == {} and list(trainable) == ['params']


@pytest.mark.parametrize('kw,own,config', [
    (dict(name='fedsomething'), 'name', 'fed.algorithm'),
    (dict(name='fedprox', prox_mu=0.1, prox_target='half'), 'prox_target', 'fed.prox_target'),
    (dict(name='fedgen_edge', num_clients=0), 'num_clients', 'fed.num_clients'),
    (dict(name='fedgen_edge', chunk=0), 'chunk', 'fed.client_chunk'),
])
def test_bad_method_params(kw, own, config):
    """Built directly, MethodParams names its own attributes; given the translator's field map
    it names the config fields instead."""
    with pytest.raises(ValueError, match=f'^{own} must be'):
        params(**kw)
    with pytest.raises(ValueError, match=f'^{config} must be'):
        params(**kw, fields=translate.METHOD_FIELDS)
