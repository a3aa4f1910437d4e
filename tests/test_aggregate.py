"""Weighted means over the stacked client axis."""
import jax.numpy as jnp
import numpy as np

from fedgen.aggregators import weighting as aggregate


def test_weighted_mean_hand_computed():
    x = {'a': jnp.array([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0]])}
    w = jnp.array([1.0, 3.0, 0.0])
    out = aggregate.weighted_mean(x, w)
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; the zero-weight client does not count.
    np.testing.assert_allclose(out['a'], [2.5, 5.0])


def test_identical_clients_return_that_client():
    one = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    x = {'w': jnp.stack([one] * 5)}
    out = aggregate.weighted_mean(x, jnp.array([3.0, 1.0, 7.0, 2.0, 5.0]))
    np.testing.assert_allclose(out['w'], one, rtol=1e-6)


def test_all_zero_weights_give_zero():
    out = aggregate.weighted_mean({'w': jnp.ones((2, 3))}, jnp.zeros(2))
    np.testing.assert_array_equal(out['w'], np.zeros(3))


def test_weighted_sum_and_scalar():
    x = jnp.array([[1.0], [2.0]])
    np.testing.assert_allclose(aggregate.weighted_sum({'x': x}, jnp.array([2.0, 3.0]))['x'], [8.0])
    avg = aggregate.weighted_average_scalar(jnp.array([1.0, 4.0]), jnp.array([3.0, 1.0]))
    np.testing.assert_allclose(avg, 1.75)
