"""The LoRA aggregation error e = ||sum_k p_k A_k B_k - Abar Bbar|| / ||sum_k p_k A_k B_k|| against
a float64 numpy reference on tiny shapes (gram, dense and auto modes; rank masks)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.aggregators import lora_math as la
from fedgen.lora import ranks as lora_ranks
from helpers_lora import R, SHAPES, clients, ref_error

_error = jax.jit(la.aggregation_error, static_argnames='mode')


def test_error_hand_example():
    """A_1 = e1, B_1 = e1^T, A_2 = e2, B_2 = e2^T, equal weights: P = I / 2, Abar Bbar = 11^T / 4,
    ||P - Abar Bbar|| = 1/2, ||P|| = 1/sqrt(2): e = 1/sqrt(2)."""
    a = np.array([[[1.], [0.]], [[0.], [1.]]], np.float32)
    ad = {'m': {'a': a, 'b': a.transpose(0, 2, 1)}}
    for mode in ('gram', 'dense'):
        err = _error(ad, ad, jnp.ones(2), mode=mode)
        np.testing.assert_allclose(err.per_module['m'], 2**-0.5, rtol=1e-6)
        np.testing.assert_allclose(err.total, 2**-0.5, rtol=1e-6)


@pytest.mark.parametrize('mode', ['gram', 'dense', 'auto'])
def test_error_matches_numpy(mode):
    ad, w = clients(4, 0), np.array([1.0, 3.0, 0.0, 2.0])
    per, total = ref_error(ad, w)
    err = _error(ad, ad, jnp.asarray(w), mode=mode)
    for n in SHAPES:
        np.testing.assert_allclose(err.per_module[n], per[n], rtol=2e-5)
    np.testing.assert_allclose(err.total, total, rtol=2e-5)
    np.testing.assert_allclose(err.mean, np.mean(list(per.values())), rtol=2e-5)
    # The absent client (w = 0) does not count: changing it changes nothing.
    other = jax.tree.map(lambda x: x.copy(), ad)
    other['q']['a'][2] += 5.0
    np.testing.assert_allclose(_error(other, other, jnp.asarray(w)).total, err.total, rtol=1e-6)


def test_error_exactly_zero_for_identicalclients():
    one = clients(1, 5)
    same = jax.tree.map(lambda x: np.repeat(x, 5, axis=0), one)
    for mode in ('gram', 'dense'):
        err = _error(same, same, jnp.array([3.0, 7.0, 1.0, 0.0, 2.0]), mode=mode)
        assert float(err.total) == 0.0 and all(float(e) == 0.0 for e in err.per_module.values())


def test_error_with_rank_masks_matches_hetlora_reference():
    ad, w = clients(4, 1), np.array([1.0, 3.0, 2.0, 2.0])
    ranks = np.array([1, 3, 2, 3])
    mask = np.asarray(lora_ranks.rank_mask(jnp.asarray(ranks), R))
    per, total = ref_error(ad, w, mask)
    err = _error(ad, ad, jnp.asarray(w), jnp.asarray(mask))
    np.testing.assert_allclose(err.total, total, rtol=2e-5)
    for n in SHAPES:
        np.testing.assert_allclose(err.per_module[n], per[n], rtol=2e-5)
