"""One client's local training: masked steps are no-ops, gradients reach only the trainable tree,
the proximal term adds mu (w - w_anchor) to the gradient, and traced hyper-parameters equal
compiled ones."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen.fl import local_update as client


def quad_loss(variables, batch, rng):
    """Per-example 0.5 ||w * c - y||^2 with a frozen scale c; mean over weighted examples."""
    del rng
    w, c = variables['lora']['w'], variables['params']['c']
    err = 0.5 * jnp.sum(jnp.square(w * c - batch['y']), axis=-1)
    wt = batch['weight']
    return (err * wt).sum() / jnp.maximum(wt.sum(), 1.0), wt.sum()


def _data(mask):
    rng = np.random.default_rng(0)
    s = len(mask)
    return {
        'batches': {
            'y': rng.normal(size=(s, 3, 2)).astype(np.float32),
            'weight': np.ones((s, 3), np.float32)
        },
        'mask': np.asarray(mask, np.float32)
    }


FROZEN = {'params': {'c': jnp.array([2.0, 0.5])}}
W0 = {'lora': {'w': jnp.array([0.3, -0.2])}}


def test_masked_steps_are_noops():
    upd = jax.jit(client.make_local_update(quad_loss, optax.adam(0.1)))
    full = _data([1, 1, 1, 1])
    masked = _data([1, 0, 1, 0])
    # Same valid batches in the same order: padding steps placed in between change nothing.
    only = {
        'batches': jax.tree.map(lambda x: x[[0, 2]], masked['batches']),
        'mask': np.ones(2, np.float32)
    }
    a = upd(FROZEN, W0, masked, jax.random.PRNGKey(0))
    b = upd(FROZEN, W0, only, jax.random.PRNGKey(0))
    np.testing.assert_allclose(a.params['lora']['w'], b.params['lora']['w'], rtol=1e-6)
    c = upd(FROZEN, W0, full, jax.random.PRNGKey(0))
    assert not np.allclose(a.params['lora']['w'], c.params['lora']['w'])
    none = upd(FROZEN, W0, _data([0, 0, 0, 0]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(none.delta['lora']['w'], np.zeros(2))
    assert float(none.weight) == 0.0


def test_sgd_step_matches_hand_gradient():
    lr = 0.1
    upd = client.make_local_update(quad_loss, optax.sgd(lr))
    data = _data([1])
    res = upd(FROZEN, W0, data, jax.random.PRNGKey(0))
    c, w, y = np.array([2.0, 0.5]), np.array([0.3, -0.2]), data['batches']['y'][0]
    grad = ((w * c - y) * c).mean(0)
    np.testing.assert_allclose(res.params['lora']['w'], w - lr * grad, rtol=1e-5)
    np.testing.assert_allclose(res.delta['lora']['w'], -lr * grad, rtol=1e-5)


def test_proximal_gradient_is_plain_plus_mu_times_distance():
    mu, lr = 0.7, 0.05
    anchor = {'lora': {'w': jnp.array([1.0, 1.0])}}
    data = _data([1])
    plain = client.make_local_update(quad_loss, optax.sgd(lr))
    prox = client.make_local_update(quad_loss, optax.sgd(lr), prox_mu=mu)
    a = plain(FROZEN, W0, data, jax.random.PRNGKey(0), anchor)
    b = prox(FROZEN, W0, data, jax.random.PRNGKey(0), anchor)
    # One SGD step: the prox step differs by exactly -lr * mu * (w0 - anchor).
    expected = -lr * mu * (np.array([0.3, -0.2]) - np.array([1.0, 1.0]))
    np.testing.assert_allclose(b.params['lora']['w'] - a.params['lora']['w'], expected, rtol=1e-5)


def test_traced_hparams_equal_the_compiled_learning_rate_and_mu():
    """hp = (s, mu): Adam with its update scaled by s equals Adam at s * lr, and a traced mu
    equals the compiled prox_mu; one jitted function serves every value (no recompile)."""
    lr, s, mu = 0.05, 3.0, 0.7
    anchor = {'lora': {'w': jnp.array([1.0, 1.0])}}
    data = _data([1, 1, 1])
    traced = jax.jit(client.make_local_update(quad_loss, optax.adam(lr)))
    for scale, m in ((s, 0.0), (1.0, mu), (s, mu)):
        got = traced(FROZEN,
                     W0,
                     data,
                     jax.random.PRNGKey(0),
                     anchor,
                     hp=(jnp.float32(scale), jnp.float32(m)))
        ref = client.make_local_update(quad_loss, optax.adam(lr * scale), prox_mu=m)
        want = ref(FROZEN, W0, data, jax.random.PRNGKey(0), anchor)
        np.testing.assert_allclose(got.params['lora']['w'], want.params['lora']['w'], rtol=1e-6)
    assert traced._cache_size() == 1
    plain = traced(FROZEN, W0, data, jax.random.PRNGKey(0), anchor)
    assert not np.allclose(plain.params['lora']['w'], got.params['lora']['w'])


def test_padded_steps_and_batches_are_not_computed_one_client_at_a_time():
    """Mapped one client at a time (client_chunk 1), a masked local step and an all-padding
    evaluation batch run no loss at all (a scalar cond, not a select): the loss is called once
    per live step and live batch, and the results equal the fully computed ones."""
    from fedgen.fl import mesh
    from fedgen.metrics import dataset_loss
    calls = []

    def counted(variables, batch, rng):
        jax.debug.callback(lambda: calls.append(1))
        return quad_loss(variables, batch, rng)

    masks = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.float32)  # 6 live steps
    data = jax.tree.map(lambda *x: np.stack(x), *[_data(m) for m in masks])
    upd = client.make_local_update(counted, optax.adam(0.1))
    run = jax.jit(lambda d, c: mesh.map_clients(
        lambda s, x: upd(FROZEN, W0, x, jax.random.PRNGKey(0)).params, None, d, c),
                  static_argnums=1)
    one = jax.block_until_ready(run(data, 1))
    assert len(calls) == 6
    calls.clear()
    both = jax.block_until_ready(run(data, 3))  # one vmap over all clients: a select
    assert len(calls) == 4  # every step, live or not (the callback fires once per batched call)
    np.testing.assert_allclose(one['lora']['w'], both['lora']['w'], rtol=1e-6)

    batches = _data([1, 1, 1])['batches']
    batches['weight'][1:] = 0.0  # batches 1 and 2 are padding
    calls.clear()
    evaluate = jax.jit(lambda b: dataset_loss.dataset_loss(counted, {
        **FROZEN,
        **W0
    }, b, jax.random.PRNGKey(0)))
    loss, weight = jax.block_until_ready(evaluate(batches))
    assert len(calls) == 1 and float(weight) == 3.0
    np.testing.assert_allclose(loss,
                               quad_loss({
                                   **FROZEN,
                                   **W0
                               }, jax.tree.map(lambda x: x[0], batches), None)[0],
                               rtol=1e-6)
