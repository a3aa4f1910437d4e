"""The population map: chunked lax.map == Python loop over clients == full vmap."""
import jax
import numpy as np
import optax
import pytest

from fedgen.fl import local_update as client
from fedgen.fl import engine
from fedgen.fl import mesh as population
from fedgen.fl.algorithm import ServerState


def _run(tiny, mode, chunk=None):
    upd = client.make_local_update(tiny.loss_fn, optax.adam(1e-2))
    data = tiny.round_data([0, 1, 2, 3, 4, 5])
    per_client = {
        'data': {
            'batches': data.batches,
            'mask': data.mask
        },
        'rng': jax.random.split(jax.random.PRNGKey(0), 6)
    }
    fn = lambda shared, x: upd(shared[0], shared[1], x['data'], x['rng']).delta
    shared = ({'params': tiny.params}, {'lora': tiny.adapters})
    if mode == 'loop':
        return population.loop_clients(fn, shared, per_client)
    return jax.jit(lambda s, p: population.map_clients(fn, s, p, chunk))(shared, per_client)


def test_chunked_equals_loop_equals_vmap(tiny):
    loop = _run(tiny, 'loop')
    for chunk in (6, 4, 2, 1):  # 6 = full vmap; 4 leaves a remainder chunk of 2
        out = _run(tiny, 'map', chunk)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(loop)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    # Deltas are not trivially zero (the comparison is meaningful).
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(loop)) > 1e-3


def test_round_equal_across_chunk_sizes(tiny):
    data = tiny.round_data([0, 2, 4, 5])
    outs = []
    for chunk in (1, 3, 4):
        alg = tiny.algorithm(chunk)
        state = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(5))
        new, _ = jax.jit(alg.apply)(state, {'params': tiny.params}, data)
        outs.append(new.trainable)
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(outs[0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bad_chunk(tiny):
    with pytest.raises(ValueError, match=r'^client_chunk must be >= 1'):
        population.map_clients(lambda s, x: x, None, np.zeros((3, 1)), 0)
    with pytest.raises(ValueError, match=r'^fed\.client_chunk must be >= 1'):
        population.map_clients(lambda s, x: x, None, np.zeros((3, 1)), 0, section='fed.')


def test_client_keys_independent_of_order():
    rng = jax.random.PRNGKey(0)
    state = ServerState(round=np.int32(2), trainable={}, opt_state=(), rng=rng)
    a = engine.client_keys(state, np.array([3, 9], np.int32))
    b = engine.client_keys(state, np.array([9, 3], np.int32))
    np.testing.assert_array_equal(a[0], b[1])
    # key_k = fold_in(fold_in(rng, round), k): the same key whatever else is sampled
    np.testing.assert_array_equal(a[1], jax.random.fold_in(jax.random.fold_in(rng, 2), 9))
    assert not np.array_equal(a[0], a[1])
