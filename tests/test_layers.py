"""LoRA-aware layers: the im2col convolution equals XLA's, values and gradients; scanned blocks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.models import layers, llama
from fedgen.tasks import objectives


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


class _Block(nn.Module):
    """tanh(LoRA-Dense(x)) + x: a block whose layers differ only by their weights."""

    @nn.compact
    def __call__(self, x, scale):
        return x + scale * jnp.tanh(layers.Dense(x.shape[-1], lora_alpha=4.0, name='d')(x)), None


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_blocks_equal_the_layer_loop_with_stacked_adapters(remat):
    """scan_blocks over L = 3 layers with stacked params and adapters (A [L, in, r], B [L, r, out])
    equals applying the blocks one by one with each layer's slice, in value and gradient."""
    stack = layers.scan_blocks(_Block, 3, remat, (nn.broadcast, ))(name='blocks')
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    params = stack.init(jax.random.PRNGKey(1), x, 0.5)['params']
    assert params['d']['kernel'].shape == (3, 5, 5)
    ad = {
        'd': {
            'a': jax.random.normal(jax.random.PRNGKey(2), (3, 5, 2)),
            'b': jax.random.normal(jax.random.PRNGKey(3), (3, 2, 5))
        }
    }

    def scanned(ad):
        return jnp.sum(stack.apply({'params': params, 'lora': ad}, x, 0.5)[0]**2)

    def looped(ad):
        y, one = x, _Block()
        for i in range(3):
            take = lambda t, i=i: jax.tree.map(lambda v: v[i], t)
            y = one.apply({'params': take(params), 'lora': take(ad)}, y, 0.5)[0]
        return jnp.sum(y**2)

    np.testing.assert_allclose(scanned(ad), looped(ad), rtol=1e-6)
    for g, h in zip(jax.tree.leaves(jax.grad(scanned)(ad)), jax.tree.leaves(jax.grad(looped)(ad))):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


def test_scanned_llama_blocks_keep_fewer_residuals_with_the_same_gradient():
    """On SmolLM2-width Llama blocks, the default backward (matmul outputs kept) needs less XLA
    temp memory than keeping every intermediate and remat less still; all three give the same
    adapter gradient (experiments.bench_residuals at 3 blocks, B = 2 x T = 64)."""
    from experiments import bench_residuals
    rows = bench_residuals.measure('smollm2', 3, 2, 64, 1)
    (_, keep_all, _, _), (_, default, _, rel_default), (_, remat, _, rel_remat) = rows
    assert remat < default < keep_all, rows
    assert rel_default < 1e-5 and rel_remat < 1e-5, rows


def test_stack_and_unstack_blocks():
    per = {'h_0': {'w': np.zeros((2, 3))}, 'h_1': {'w': np.ones((2, 3))}, 'wte': np.ones(4)}
    st = layers.stack_blocks(per, 'h_', 'h')
    assert st['h']['w'].shape == (2, 2, 3) and isinstance(st['h']['w'], np.ndarray)
    back = layers.unstack_blocks(st, 'h', 'h_')
    assert back.keys() == per.keys()
    np.testing.assert_array_equal(back['h_1']['w'], per['h_1']['w'])
    with pytest.raises(ValueError, match='x.y: h_1 is missing'):
        layers.stack_blocks({'h_0': per['h_0'], 'h_2': per['h_1']}, 'h_', 'h', 'x.y')
    with pytest.raises(ValueError, match=r'x.y: h_1/w is \(3,\) but h_0 has \(2, 3\)'):
        layers.stack_blocks({'h_0': per['h_0'], 'h_1': {'w': np.ones(3)}}, 'h_', 'h', 'x.y')


def test_bf16_blocks_on_cpu_keep_one_layer_of_float32_kernels():
    """bf16 weights: XLA:CPU converts each layer's kernels to f32 for its dots; with
    layers.compiler_options the converts stay inside the layer loop, so the program's temporaries
    fall below float32's instead of holding an f32 copy of every stacked kernel."""
    temps = {}
    for dt in ('float32', 'bfloat16'):
        cfg = llama.LlamaConfig(vocab_size=64,
                                n_positions=16,
                                n_embd=32,
                                n_layer=6,
                                n_head=4,
                                n_kv_head=2,
                                n_inner=64,
                                dtype=dt)
        params = llama.cast_frozen(llama.init_params(cfg, jax.random.PRNGKey(0)), dt)
        loss = objectives.next_token_loss(llama.Llama(cfg))
        batch = {'tokens': jnp.zeros((2, 9), jnp.int32), 'weight': jnp.ones((2, ))}
        grad = jax.grad(lambda p: loss({'params': p}, batch, None)[0])
        for opts in ({}, layers.compiler_options(dt)):
            m = jax.jit(grad, compiler_options=opts).lower(params).compile().memory_analysis()
            temps[dt, bool(opts)] = m.temp_size_in_bytes
    assert layers.compiler_options('float32') == {}
    assert temps['bfloat16', True] < temps['float32', False] < temps['bfloat16', False]
