"""Orbax round checkpoints and saved trees: round trip, keep-last-N, clear errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen import checkpoint
from fedgen.algorithms import fedavg


def _state(v):
    tr = {'lora': {'a': jnp.full((3, 2), v), 'b': jnp.zeros((2, 3))}}
    tx = optax.adam(1e-3)
    return fedavg.ServerState(round=jnp.int32(v),
                              trainable=tr,
                              opt_state=tx.init(tr),
                              rng=jax.random.PRNGKey(int(v)))


def test_round_trip_and_keep(tmp_path):
    m = checkpoint.manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpoint.save(m, step, state=_state(float(step)))
    checkpoint.wait(m)
    m2 = checkpoint.manager(str(tmp_path), keep=2)
    assert checkpoint.latest(m2) == 3
    assert sorted(m2.all_steps()) == [2, 3]
    got = checkpoint.restore(m2, 3, state=_state(0.0))['state']
    assert isinstance(got, fedavg.ServerState) and int(got.round) == 3
    np.testing.assert_array_equal(got.trainable['lora']['a'], np.full((3, 2), 3.0))
    np.testing.assert_array_equal(got.rng, jax.random.PRNGKey(3))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    m = checkpoint.manager(str(tmp_path), keep=1)
    checkpoint.save(m, 1, state=_state(1.0))
    checkpoint.wait(m)
    other = _state(0.0).replace(trainable={'lora': {'z': jnp.zeros(4)}})
    with pytest.raises(ValueError, match='checkpoint'):
        checkpoint.restore(checkpoint.manager(str(tmp_path), keep=1), 1, state=other)


def test_save_and_load_tree(tmp_path):
    tree = {'w': jnp.arange(6.0).reshape(2, 3), 'b': {'c': jnp.ones(2)}}
    path = os.path.join(tmp_path, 'bb')
    checkpoint.save_tree(path, tree)
    got = checkpoint.load_tree(path, jax.tree.map(jnp.zeros_like, tree), 'pretrain.backbone_path')
    np.testing.assert_array_equal(got['w'], tree['w'])
    with pytest.raises(ValueError, match='pretrain.backbone_path'):
        checkpoint.load_tree(os.path.join(tmp_path, 'missing'), tree, 'pretrain.backbone_path')


def test_corrupt_tree_is_a_clear_error(tmp_path):
    tree = {'w': jnp.ones((4, 4))}
    path = os.path.join(tmp_path, 'bb')
    checkpoint.save_tree(path, tree)
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), 'wb') as fh:
                fh.write(b'garbage')
    with pytest.raises(ValueError, match='backbone'):
        checkpoint.load_tree(path, tree, 'pretrain.backbone_path')


def test_bad_keep(tmp_path):
    with pytest.raises(ValueError, match='checkpoint.keep'):
        checkpoint.manager(str(tmp_path), keep=0)
