"""The round's small defects, each pinned: Multi-Krum with one present client, a centralized round
with a non-finite update, train_loss when an excluded client diverged, and a noise multiplier
given together with a target epsilon."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ptb_fedgen_edge
from experiments import translate
from fedgen import algorithms
from fedgen.aggregators import robust
from test_algorithms import _data, quadratic


def _alg(name):
    p = algorithms.MethodParams(name, 4, optax.sgd(0.1), optax.sgd(1.0))
    alg = algorithms.make(p, quadratic)
    return alg, alg.init({'w': {'x': jnp.zeros(2)}}, jax.random.PRNGKey(0))


@pytest.mark.parametrize('slot', [0, 2, 4])
def test_multi_krum_with_one_present_client_returns_its_update(slot):
    x = jnp.arange(10.0).reshape(5, 2) + 1.0
    w = jnp.zeros(5).at[slot].set(3.0)
    out, metrics = robust.reduce('multi_krum', {'u': x}, w, f=1, m=0)
    np.testing.assert_array_equal(out['u'], x[slot])
    np.testing.assert_array_equal(metrics['selected'], (np.arange(5) == slot).astype(np.float32))


def test_centralized_round_never_applies_a_non_finite_update():
    alg, state = _alg('centralized')
    new, m = jax.jit(alg.apply)(state, {}, _data([[[np.nan, 1.0]], [[1.0, 2.0]]], [0, 1]))
    chex.assert_trees_all_equal(new.trainable, state.trainable)
    assert float(m['clients_used']) == 0 and float(m['clients_nonfinite']) == 2
    assert np.isfinite(float(m['train_loss'])) and int(new.round) == 1


def test_train_loss_ignores_an_excluded_diverged_client():
    alg, state = _alg('fedgen_edge')
    good = [[[1.0, 2.0]]]
    _, clean = jax.jit(alg.apply)(state, {}, _data(good, [3]))
    _, m = jax.jit(alg.apply)(state, {}, _data([[[np.inf, 0.0]]] + good, [0, 3]))
    assert float(m['clients_used']) == 1 and list(np.asarray(m['nonfinite_ids'])) == [0, -1]
    np.testing.assert_allclose(float(m['train_loss']), float(clean['train_loss']), rtol=1e-6)


def test_noise_multiplier_with_target_epsilon_is_refused():
    c = ptb_fedgen_edge.get_config('tiny')
    c.fed.dp.update(clip_norm=0.1, noise_multiplier=1.0, target_epsilon=8.0)
    with pytest.raises(ValueError) as err:
        translate.spec(c)
    msg = str(err.value)
    assert 'fed.dp.noise_multiplier' in msg and 'fed.dp.target_epsilon' in msg and '\n' not in msg


def test_client_drift_hook_with_a_robust_reduction_is_refused():
    c = ptb_fedgen_edge.get_config('tiny')
    c.fed.update(log_client_drift=True, aggregator='median')
    with pytest.raises(ValueError) as err:
        translate.spec(c)
    msg = str(err.value)
    assert 'fed.log_client_drift' in msg and 'fed.aggregator' in msg and '\n' not in msg
