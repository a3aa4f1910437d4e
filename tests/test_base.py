"""The base types: ServerState is an immutable pytree that jit, tree maps and replace respect."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.fl.algorithm import ServerState


def _state():
    return ServerState(round=jnp.int32(3),
                       trainable={'lora': {
                           'a': jnp.ones((2, 3))
                       }},
                       opt_state=(jnp.zeros(2), ),
                       rng=jax.random.PRNGKey(1),
                       clients={'lora': {
                           'b': jnp.arange(8.0).reshape(4, 2)
                       }})


def test_server_state_is_a_pytree_of_all_its_fields():
    s = _state()
    leaves, treedef = jax.tree.flatten(s)
    # round, a, opt_state[0], rng, b (aux defaults to {}: no leaves)
    assert len(leaves) == 5 and s.aux == {}
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, ServerState)
    chex.assert_trees_all_equal(back, s)
    doubled = jax.tree.map(lambda x: x * 2, s)
    np.testing.assert_array_equal(doubled.clients['lora']['b'], 2 * np.arange(8.0).reshape(4, 2))


def test_server_state_passes_through_jit_and_replace_is_functional():
    s = _state()

    @jax.jit
    def step(state):
        return state.replace(round=state.round + 1,
                             trainable=jax.tree.map(lambda x: x + 1, state.trainable))

    new = step(s)
    assert isinstance(new, ServerState) and int(new.round) == 4 and int(s.round) == 3
    np.testing.assert_array_equal(new.trainable['lora']['a'], 2 * np.ones((2, 3)))
    np.testing.assert_array_equal(s.trainable['lora']['a'], np.ones((2, 3)))  # not mutated
    chex.assert_trees_all_equal(new.clients, s.clients)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.round = jnp.int32(0)
