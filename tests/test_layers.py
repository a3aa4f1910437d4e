"""LoRA-aware layers: the im2col convolution equals XLA's, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.models import layers


def _xla(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x,
                                        w,
                                        strides,
                                        padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('k,strides,padding', [(3, (1, 1), 'SAME'), (3, (2, 2), 'SAME'),
                                               (1, (1, 1), 'SAME'), (3, (1, 1), 'VALID'),
                                               (2, (2, 1), 'SAME')])
def test_im2col_equals_xla(k, strides, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 3, 5))
    ref = _xla(x, w, strides, padding)
    got = layers.im2col_conv(x, w, strides, padding)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, padding)))
    gx, gw = jax.grad(loss(layers.im2col_conv), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(_xla), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gw, rw, atol=1e-4, rtol=1e-4)


def test_conv_impls_agree_with_lora():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    mods = [layers.Conv(6, impl=impl) for impl in layers.CONV_IMPLS]
    params = mods[0].init(jax.random.PRNGKey(1), x)['params']
    lora = {
        'a': jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 2)),
        'b': jax.random.normal(jax.random.PRNGKey(3), (2, 6))
    }
    outs = [m.apply({'params': params, 'lora': lora}, x) for m in mods]
    # float32 sums in another order; outputs are O(10) here (alpha / r = 8 scales the update).
    scale = float(np.abs(np.asarray(outs[0])).max())
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-6 * scale, rtol=1e-5)
    base = mods[0].apply({'params': params}, x)
    assert np.abs(np.asarray(outs[0] - base)).max() > 1e-3
