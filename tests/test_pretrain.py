"""Central pre-training (fedgen.fl.pretrain): the weights' EMA as the backbone, its refusals, and
the recipe that keys the cache."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen import tasks
from fedgen.fl import pretrain


def _loss(variables, batch, key):
    """Mean squared distance of the parameter vector to the batch's targets: (loss, weight)."""
    del key
    w = variables['params']['w']
    return jnp.mean((batch['x'] - w)**2), jnp.float32(batch['x'].shape[0])


def _examples(n=12, d=3):
    return {'x': np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)}


def _run(steps, segment, ema_decay=0.0):
    params = {'w': jnp.zeros(3, jnp.float32)}
    return list(
        pretrain.train(_loss,
                       optax.sgd(0.3),
                       params,
                       _examples(),
                       steps,
                       4,
                       seed=5,
                       segment=segment,
                       ema_decay=ema_decay))


def test_the_ema_backbone_averages_the_weights_of_every_step():
    steps, decay = 7, 0.8
    raw = [np.asarray(p['w']) for _, _, p in _run(steps, segment=1)]  # w_1 .. w_7
    ema = np.zeros(3, np.float32)  # w_0
    for s, w in enumerate(raw):
        d = min(decay, (1 + s) / (10 + s))
        ema = d * ema + (1 - d) * w
    # segments of 3: the last one holds a masked (no-op) step, which must not move the average
    got = _run(steps, segment=3, ema_decay=decay)
    assert [done for done, _, _ in got] == [3, 6, 7]
    np.testing.assert_allclose(got[-1][2]['w'], ema, rtol=1e-5, atol=1e-6)
    assert np.abs(ema - raw[-1]).max() > 1e-2  # the average is not the last weights
    # the training itself is unchanged: same losses as without the average
    plain = _run(steps, segment=3)
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in plain], rtol=1e-6)


def test_bad_decays_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r'^ema_decay must be a number in \[0, 1\), got 1.0$'):
        _run(2, 1, ema_decay=1.0)
    with pytest.raises(ValueError, match=r'^ema_decay must be a number in \[0, 1\)'):
        pretrain.with_param_ema(optax.sgd(0.1), -0.5)
    pre = tasks.Pretrain(steps=0, batch_size=4, opt='adam', lr=1e-3, ema_decay=0.9)
    with pytest.raises(ValueError, match=r'^pretrain.ema_decay=0.9 needs pretrain.steps > 0'):
        pre.check(section='pretrain.')
    with pytest.raises(ValueError, match=r'^ema_decay=0.9 needs steps > 0'):
        pre.check()


def test_the_recipe_names_the_decay_only_when_on():
    off = tasks.Pretrain(steps=10, batch_size=4, opt='adam', lr=1e-3)
    on = tasks.Pretrain(steps=10, batch_size=4, opt='adam', lr=1e-3, ema_decay=0.999)
    off.check()
    on.check()
    assert off.recipe() == {'steps': 10, 'batch_size': 4, 'opt': 'adam', 'lr': 1e-3}
    assert on.recipe() == {**off.recipe(), 'ema_decay': 0.999}
    assert pretrain.recipe_hash(on.recipe()) != pretrain.recipe_hash(off.recipe())
