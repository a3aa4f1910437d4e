"""Tests for the server-side EMA of the global trainable tree (fedgen.fl.algorithm.with_ema)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.fl import algorithm as base


def test_ema_update_and_warmup_by_hand():
    ema = {'lora': {'a': jnp.array([1.0, 2.0]), 'b': jnp.array([[4.0]])}}
    new = {'lora': {'a': jnp.array([3.0, -2.0]), 'b': jnp.array([[0.0]])}}
    got = base.ema_update(ema, new, jnp.float32(0.75))  # 0.75 e + 0.25 w
    np.testing.assert_allclose(got['lora']['a'], [1.5, 1.0])
    np.testing.assert_allclose(got['lora']['b'], [[3.0]])
    # d_t = min(decay, (1 + t) / (10 + t)).
    np.testing.assert_allclose(base.ema_decay_at(0.99, 0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(base.ema_decay_at(0.99, 10), 11 / 20, rtol=1e-6)
    np.testing.assert_allclose(base.ema_decay_at(0.5, 100), 0.5, rtol=1e-6)


def _counting_algorithm():
    """A stand-in method: each round adds 1 to every leaf and writes its own aux entry."""

    def init(trainable, rng):
        return base.ServerState(round=jnp.zeros((), jnp.int32),
                                trainable=trainable,
                                opt_state={},
                                rng=rng,
                                aux={'clip': jnp.float32(1.0)})

    def apply(state, frozen, data):
        assert set(state.aux) == {'clip'}  # the inner method never sees the EMA
        new = jax.tree.map(lambda x: x + 1.0, state.trainable)
        aux = {'clip': state.aux['clip'] * 2}
        return state.replace(round=state.round + 1, trainable=new, aux=aux), {'m': 0.0}

    return base.Algorithm(init, apply, lambda d: d, lambda w: w)


def test_with_ema_two_rounds_by_hand_and_training_unchanged():
    alg = _counting_algorithm()
    ema_alg = base.with_ema(alg, 0.9)
    w0 = {'lora': {'a': jnp.array([0.0, 10.0])}}
    s, e = alg.init(w0, jax.random.PRNGKey(0)), ema_alg.init(w0, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(base.ema_of(e)['lora']['a'], [0.0, 10.0])
    assert base.ema_of(s) is None
    apply = jax.jit(ema_alg.apply)
    for _ in range(2):
        s, _ = alg.apply(s, None, None)
        e, m = apply(e, None, None)
    # The method's own state is untouched by the EMA.
    np.testing.assert_array_equal(e.trainable['lora']['a'], s.trainable['lora']['a'])
    np.testing.assert_array_equal(e.aux['clip'], s.aux['clip'])
    assert int(e.round) == 2 and m == {'m': 0.0}
    # Round 1: d_0 = 0.1 -> 0.1 w0 + 0.9 w1; round 2: d_1 = 2/11 -> d_1 ema1 + (1 - d_1) w2.
    w0, w1, w2 = np.array([0.0, 10.0]), np.array([1.0, 11.0]), np.array([2.0, 12.0])
    ema1 = 0.1 * w0 + 0.9 * w1
    want = 2 / 11 * ema1 + 9 / 11 * w2
    np.testing.assert_allclose(base.ema_of(e)['lora']['a'], want, rtol=1e-6)


def test_decay_zero_changes_nothing(tiny):
    alg = tiny.algorithm(chunk=2)
    assert base.with_ema(alg, 0.0) is alg and base.with_ema(alg, 0) is alg
    state = base.with_ema(alg, 0.0).init({'lora': tiny.adapters}, jax.random.PRNGKey(3))
    assert base.EMA_KEY not in state.aux and base.ema_of(state) is None


@pytest.mark.parametrize('decay', [1.0, -0.1, 1.5, True, '0.9', None])
def test_bad_decay_is_one_line_naming_the_field(decay):
    with pytest.raises(ValueError, match=r'^ema_decay must be a number in \[0, 1\)') as e:
        base.with_ema(_counting_algorithm(), decay)
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match=r'^fed\.ema_decay must be a number in \[0, 1\)'):
        base.with_ema(_counting_algorithm(), decay, section='fed.')


def test_ema_state_checkpointed_resume_equals_unbroken(tiny, tmp_path):
    """Round 1, an Orbax save and a restore into the initial state's template, then round 2:
    the same state (EMA included) as two unbroken rounds."""
    from fedgen.io import checkpoint
    alg = base.with_ema(tiny.algorithm(chunk=2), 0.5)
    apply = jax.jit(alg.apply)
    init = alg.init({'lora': tiny.adapters}, jax.random.PRNGKey(3))
    frozen = {'params': tiny.params}
    data = [tiny.round_data([0, 4], 0), tiny.round_data([1, 5], 1)]
    s1, _ = apply(init, frozen, data[0])
    unbroken, _ = apply(s1, frozen, data[1])
    mngr = checkpoint.manager(str(tmp_path), 2)
    checkpoint.save(mngr, 1, state=jax.device_get(s1))
    checkpoint.wait(mngr)
    step, items, _ = checkpoint.restore_latest(mngr, state=jax.device_get(init))
    resumed, _ = apply(items['state'], frozen, data[1])
    assert step == 1 and int(resumed.round) == 2
    for x, y in zip(jax.tree.leaves(unbroken), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ema, w = jax.tree.leaves(base.ema_of(unbroken)), jax.tree.leaves(unbroken.trainable)
    assert any(not np.array_equal(a, b) for a, b in zip(ema, w))
