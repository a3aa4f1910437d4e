"""Tests for fedgen.models.unet: shapes, LoRA invariants, trainability, config validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedgen.models import diffusion
from fedgen.lora import adapters as lora
from fedgen.models import unet

# Two levels (32, 16) with attention at 16 and in the middle: every block type, small and fast.
TINY = unet.UNetConfig(channels=8,
                       channel_mult=(1, 2),
                       num_res_blocks=1,
                       attn_resolutions=(16, ),
                       num_heads=2,
                       groups=4,
                       lora_alpha=4.0)


def _inputs(cfg, n=2, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (n, cfg.image_size, cfg.image_size, cfg.image_channels),
                           minval=-1,
                           maxval=1)
    t = jax.random.randint(kt, (n, ), 0, 1000, dtype=jnp.int32)
    return x, t


def _trained_like(cfg, seed=1):
    """Random params with the UNet's tree, standing in for a pre-trained backbone.

    Built with numpy from ``jax.eval_shape`` of the init: tracing is cheap, while compiling one
    jax.random call per leaf costs tens of seconds on this CPU. Kernels ~ N(0, 1/fan_in),
    GroupNorm scales ~ 1 + N(0, 0.05^2), biases ~ N(0, 0.05^2): no leaf is zero.
    """
    shapes = unet.param_shapes(cfg)
    gen = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for path, leaf in flat.items():
        noise = gen.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == 'kernel':
            out[path] = noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        else:
            out[path] = np.float32(path[-1] == "scale") + np.float32(0.05) * noise
    return traverse_util.unflatten_dict(out)


def _random_b(adapters, seed=2):
    """Adapters with every B drawn at random (as after some training)."""
    gen = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapters)
    out = {
        p: (0.1 * gen.standard_normal(v.shape).astype(np.float32) if p[-1] == 'b' else v)
        for p, v in flat.items()
    }
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope='module')
def tiny():
    model = unet.UNet(TINY)
    apply = jax.jit(lambda variables, x, t: model.apply(variables, x, t))
    return _trained_like(TINY), apply


def test_output_shape_dtype_and_t_dependence(tiny):
    params, apply = tiny
    x, t = _inputs(TINY, n=3)
    out = apply({'params': params}, x, t)
    assert out.shape == (3, 32, 32, 3) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    other = apply({'params': params}, x, t + 100)
    assert float(jnp.max(jnp.abs(out - other))) > 1e-4


def test_attention_projections_match_attn_preset(tiny):
    params, _ = tiny
    paths = ['/'.join(p) for p in lora.target_paths(params, 'attn')]
    # TINY has attention at 16x16 (1 down + 2 up blocks) and in the middle: 4 blocks x q, k, v, o.
    assert len(paths) == 16
    assert all(p.split('/')[-2] in 'qkvo' and p.split('/')[-3].endswith('attn') for p in paths)
    convs = ['/'.join(p) for p in lora.target_paths(params, unet.CONV_RULE)]
    # One res block per level down (2), two per level up (4), two in the middle: 8 x conv1/conv2.
    assert len(convs) == 16 and all(p.split('/')[-2] in ('conv1', 'conv2') for p in convs)


@pytest.mark.parametrize('rules', ['attn', unet.CONV_RULE])
def test_lora_b_zero_is_exactly_frozen_model(tiny, rules):
    params, apply = tiny
    x, t = _inputs(TINY)
    adapters = lora.init(jax.random.key(3), params, rules, rank=2)
    frozen = apply({'params': params}, x, t)
    adapted = apply({'params': params, 'lora': adapters}, x, t)
    np.testing.assert_array_equal(adapted, frozen)


@pytest.mark.parametrize('rules', ['attn', unet.CONV_RULE])
def test_lora_nonzero_b_changes_output_and_equals_merged(tiny, rules):
    params, apply = tiny
    x, t = _inputs(TINY)
    adapters = _random_b(lora.init(jax.random.key(3), params, rules, rank=2))
    frozen = apply({'params': params}, x, t)
    adapted = apply({'params': params, 'lora': adapters}, x, t)
    assert float(jnp.max(jnp.abs(adapted - frozen))) > 1e-3
    merged = apply({'params': lora.merge(params, adapters, TINY.lora_alpha)}, x, t)
    # Same function, different float32 summation order: agreement to ~1e-6 relative.
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-5)


def test_adam_steps_decrease_eps_loss():
    cfg = unet.UNetConfig(channels=8,
                          channel_mult=(1, ),
                          num_res_blocks=1,
                          attn_resolutions=(),
                          groups=4,
                          image_size=8)
    model = unet.UNet(cfg)
    sched = diffusion.linear_schedule(100)
    params = unet.init_params(cfg, jax.random.key(0))
    # Tiny data set: four fixed images with smooth structure, values in [-1, 1].
    grid = jnp.linspace(-1, 1, 8)
    base = grid[:, None] * grid[None, :]  # [8, 8]
    data = jnp.stack([base * s for s in (1.0, -1.0, 0.5, -0.5)])  # [4, 8, 8]
    data = jnp.broadcast_to(data[..., None], (4, 8, 8, 3))

    def loss(p, rng):
        eps_fn = lambda x, t: model.apply({'params': p}, x, t)
        return jnp.mean(diffusion.eps_loss_terms(eps_fn, sched, jnp.tile(data, (8, 1, 1, 1)), rng))

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state, rng):
        value, grads = jax.value_and_grad(loss)(p, rng)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    eval_key = jax.random.key(99)
    before = float(jax.jit(loss)(params, eval_key))
    # Small head init: a fresh model predicts eps_hat near 0, so its loss is near E[eps^2] = 1.
    assert 0.9 < before < 1.1, before
    state = opt.init(params)
    for i in range(30):
        params, state, _ = step(params, state, jax.random.key(i))
    after = float(jax.jit(loss)(params, eval_key))
    assert after < 0.7 * before, (before, after)


def test_ddim_sampler_runs_with_unet(tiny):
    params, _ = tiny
    model = unet.UNet(TINY)
    sched = diffusion.linear_schedule(100)
    eps_fn = lambda x, t: model.apply({'params': params}, x, t)
    out = jax.jit(lambda r: diffusion.ddim_sample(eps_fn, sched, (1, 32, 32, 3), r, 2))(
        jax.random.key(0))
    assert out.shape == (1, 32, 32, 3)
    assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)


def test_bad_input_shape_raises(tiny):
    params, apply = tiny
    x = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(ValueError, match=r'^image_size/image_channels expect x of shape'):
        apply({'params': params}, x, jnp.zeros((2, ), jnp.int32))


@pytest.mark.parametrize('field, value', [
    ('channels', 7),
    ('channels', 0),
    ('channel_mult', ()),
    ('channel_mult', (1, 0)),
    ('num_res_blocks', 0),
    ('attn_resolutions', (12, )),
    ('num_heads', 3),
    ('dropout', 1.0),
    ('dropout', -0.1),
    ('groups', 5),
    ('lora_alpha', 0.0),
    ('image_channels', 0),
    ('image_size', 30),
])
def test_config_errors_name_the_field(field, value):
    """Built directly the config names its own field; with section= the caller's."""
    with pytest.raises(ValueError, match=rf'^{field} must be '):
        unet.UNetConfig(**{field: value})
    with pytest.raises(ValueError, match=rf'^model\.{field} must be '):
        unet.UNetConfig(**{field: value}, section='model.')


def test_section_is_not_a_field():
    """section only words the errors: not stored, compared, hashed or exported."""
    a, b = unet.UNetConfig(section='model.'), unet.UNetConfig()
    assert a == b and hash(a) == hash(b) and 'section' not in dataclasses.asdict(a)
    with pytest.raises(ValueError) as e:
        unet.UNetConfig(channels=8, groups=3, section='model.')
    assert str(e.value) == 'model.groups must be an int >= 1 dividing model.channels (8), got 3'


def test_config_accepts_lists_and_is_hashable():
    cfg = unet.UNetConfig(channel_mult=[1, 2], attn_resolutions=[16])
    assert cfg.channel_mult == (1, 2) and cfg.resolutions() == (32, 16)
    hash(cfg)


def test_dropout_zero_is_today_and_positive_is_train_only(tiny):
    """p = 0: train=True is the very same output (no op added). p > 0: same params (dropout has
    none); training outputs change, are fixed by the dropout key; evaluation is deterministic and
    equals the p = 0 model."""
    params, apply = tiny
    x, t = _inputs(TINY, n=3)
    want = np.asarray(apply({'params': params}, x, t))
    m0 = unet.UNet(TINY)
    train0 = jax.jit(lambda v: m0.apply(v, x, t, train=True))
    np.testing.assert_array_equal(np.asarray(train0({'params': params})), want)
    cfg = unet.UNetConfig(**{**TINY.__dict__, 'dropout': 0.3})
    assert jax.tree.structure(unet.param_shapes(cfg)) == jax.tree.structure(params)
    model = unet.UNet(cfg)
    drop = jax.jit(
        lambda key: model.apply({'params': params}, x, t, train=True, rngs={'dropout': key}))
    a, b, c = (np.asarray(drop(jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - want).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    ev = jax.jit(lambda v: model.apply(v, x, t))
    np.testing.assert_array_equal(np.asarray(ev({'params': params})), want)
