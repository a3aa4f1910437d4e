"""Simulated Byzantine clients: fixed attacker ids, each attack kind, honest clients untouched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.fl import attacks

RNG = np.random.default_rng(1)
UPLOADS = {
    'a': jnp.asarray(RNG.normal(size=(5, 3, 2)).astype(np.float32)),
    'b': {
        'c': jnp.asarray(RNG.normal(size=(5, 4)).astype(np.float32))
    }
}
IS_BAD = jnp.array([0, 1, 0, 1, 1], jnp.float32)


def _client(tree, k):
    return np.concatenate([np.asarray(x[k]).ravel() for x in jax.tree.leaves(tree)])


def test_attacker_set_is_fixed_and_sized():
    ids = attacks.attacker_ids(100, 0.3, seed=5)
    assert len(ids) == 30 and len(set(ids.tolist())) == 30
    np.testing.assert_array_equal(ids, attacks.attacker_ids(100, 0.3, seed=5))
    assert not np.array_equal(ids, attacks.attacker_ids(100, 0.3, seed=6))
    # Nested: a larger fraction keeps the smaller fraction's attackers (same permutation).
    assert set(attacks.attacker_ids(100, 0.1, 5)) <= set(ids.tolist())
    assert len(attacks.attacker_ids(10, 0.0, 0)) == 0
    mask = attacks.attacker_mask(jnp.array([ids[0], -1, 100, ids[1], 0]), 100, 0.3, seed=5)
    want = [1.0, 0.0, 0.0, 1.0, float(0 in ids)]
    np.testing.assert_array_equal(mask, want)
    assert mask.dtype == jnp.float32


def test_attacker_mask_traces_ids():
    f = jax.jit(lambda ids: attacks.attacker_mask(ids, 20, 0.25, seed=0))
    ids = jnp.arange(20)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(f(ids))),
                                  attacks.attacker_ids(20, 0.25, 0))


@pytest.mark.parametrize('kind', attacks.KINDS)
def test_honest_clients_unchanged(kind):
    out = attacks.apply(kind, UPLOADS, IS_BAD, jax.random.PRNGKey(0), scale=-3.0, noise_norm=2.0)
    for k in (0, 2):
        np.testing.assert_array_equal(_client(out, k), _client(UPLOADS, k))
    assert jax.tree.structure(out) == jax.tree.structure(UPLOADS)


def test_sign_flip_and_scale():
    flip = attacks.apply('sign_flip', UPLOADS, IS_BAD, jax.random.PRNGKey(0))
    big = attacks.apply('scale', UPLOADS, IS_BAD, jax.random.PRNGKey(0), scale=-4.0)
    for k in (1, 3, 4):
        np.testing.assert_array_equal(_client(flip, k), -_client(UPLOADS, k))
        np.testing.assert_allclose(_client(big, k), -4.0 * _client(UPLOADS, k), rtol=1e-7)


def test_gaussian_has_the_given_norm_and_differs_per_client():
    out = attacks.apply('gaussian', UPLOADS, IS_BAD, jax.random.PRNGKey(3), noise_norm=2.5)
    vs = [_client(out, k) for k in (1, 3, 4)]
    for v in vs:
        np.testing.assert_allclose(np.linalg.norm(v), 2.5, rtol=1e-5)
    assert not np.allclose(vs[0], vs[1])
    # It is a Gaussian direction: over many clients, the mean coordinate is ~0 and the
    # coordinates of one client have sd ~ norm / sqrt(D).
    many = {'x': jnp.zeros((400, 50))}
    z = np.asarray(
        attacks.apply('gaussian', many, jnp.ones(400), jax.random.PRNGKey(1), noise_norm=1.0)['x'])
    assert abs(z.mean()) < 4 * (1 / np.sqrt(50)) / np.sqrt(z.size)
    np.testing.assert_allclose(z.std(), 1 / np.sqrt(50), rtol=0.05)


def test_same_value_colluders_agree():
    out = attacks.apply('same_value', UPLOADS, IS_BAD, jax.random.PRNGKey(3), noise_norm=7.0)
    v1, v3, v4 = (_client(out, k) for k in (1, 3, 4))
    np.testing.assert_array_equal(v1, v3)
    np.testing.assert_array_equal(v1, v4)
    np.testing.assert_allclose(np.linalg.norm(v1), 7.0, rtol=1e-5)


def test_traced_scale_does_not_recompile():
    traces = []

    @jax.jit
    def f(u, s, n):
        traces.append(1)
        return attacks.apply('scale', u, IS_BAD, jax.random.PRNGKey(0), scale=s, noise_norm=n)

    a = f(UPLOADS, 2.0, 1.0)
    b = f(UPLOADS, 5.0, 1.0)
    assert len(traces) == 1
    np.testing.assert_allclose(_client(b, 1), 2.5 * _client(a, 1), rtol=1e-6)


@pytest.mark.parametrize('args,field', [
    (('flip', 0.1), 'fed.attack.kind'),
    (('scale', 1.0), 'fed.attack.fraction'),
    (('scale', -0.1), 'fed.attack.fraction'),
    (('scale', 0.1, float('inf')), 'fed.attack.scale'),
    (('gaussian', 0.1, 1.0, -1.0), 'fed.attack.noise_norm'),
])
def test_check(args, field):
    """The library names its own fields (attack.*); the caller's section prefixes them."""
    own = field.removeprefix('fed.')
    with pytest.raises(ValueError, match='^' + own.replace('.', r'\.')) as e:
        attacks.check(*args)
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='^' + field.replace('.', r'\.')):
        attacks.check(*args, section='fed.')
    attacks.check('none', 0.0)
    attacks.check('same_value', 0.3, 1.0, 5.0)
