"""DDPM epsilon-prediction U-Net for small square images (32x32 CIFAR-10 by default).

The network maps a noisy image and its timestep to a noise estimate,

    eps_hat = UNet(x_t, t),    x_t [N, S, S, C] float32 in about [-1, 1], t [N] int32,

following Ho et al. (2020): a sinusoidal time embedding fed through an MLP, residual blocks with
additive time conditioning, self-attention at the resolutions in ``attn_resolutions``, strided-conv
downsampling, nearest-neighbour + conv upsampling, and skip connections from every down block.
Every kernel belongs to a :class:`fedgen.models.layers.Dense` or
:class:`~fedgen.models.layers.Conv`, so a LoRA rule (see :mod:`fedgen.lora.adapters`) can target
any of them.

Parameter paths (the names the LoRA rules match):

    temb_0, temb_1                               time MLP (Dense)
    conv_in, conv_out                            stem and head (Conv)
    down{l}_{i}_res / up{l}_{i}_res / mid_{i}_res
        conv1, conv2 (3x3 Conv), temb (Dense), skip (1x1 Conv, when channels change)
    down{l}_{i}_attn / up{l}_{i}_attn / mid_attn
        q, k, v, o (Dense over channels)
    down{l}_downsample, up{l}_upsample           3x3 Conv (stride 2 / after nearest x2)

Useful LoRA rules:

* ``'attn'`` (preset, ``attn/(q|k|v|o)/kernel$``): every attention projection; the cheapest
  adapter (16x16 and the middle block only by default).
* ``'qv'`` (preset): q and v only, half of the above.
* :data:`CONV_RULE` ``res/conv\\d/kernel$``: both 3x3 convs of every residual block, adapted as
  A [3, 3, in, r], B [r, out]; far more expressive for image style. Combine as
  ``('attn', CONV_RULE)``.

No kernel is initialised to exactly zero: a zero ``o`` or ``conv2`` in an untrained, frozen backbone
would give adapters upstream of it an identically zero gradient. The head ``conv_out`` is only
*small* (std 0.1 / sqrt(fan_in)), so a fresh model predicts eps_hat close to 0 (loss near 1).

Size: the default config (channels 64, channel_mult (1, 2, 2), 2 residual blocks per level,
attention at 16x16) has 6,472,195 parameters (3x32x32 images).
"""
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgen.models import layers

# Low-rank adapters on both 3x3 convolutions of every residual block.
CONV_RULE = r'res/conv\d/kernel$'

# DDPM's default initialiser (Xavier/Glorot uniform) for every kernel but the head.
_INIT = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
_HEAD_INIT = nn.initializers.variance_scaling(0.01, 'fan_in', 'truncated_normal')


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`, checked when built (one-line ValueErrors naming the field;
    ``section``, not stored, is the caller's prefix for the names, e.g. 'model.').

    channels: base width C; level l has C * channel_mult[l] channels.
    channel_mult: one multiplier per resolution level (level l works at image_size / 2**l).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: spatial sizes (e.g. 16) whose blocks are followed by self-attention.
    num_heads: attention heads; must divide ``channels``.
    dropout: rate p in [0, 1) of the dropout in every residual block (DDPM: before conv2);
        active only with ``train=True`` (then apply needs ``rngs={'dropout': key}``).
        0.0 adds no op at all.
    groups: GroupNorm groups; must divide ``channels``.
    lora_alpha: LoRA scale numerator passed to every Dense/Conv (update = alpha / r * A B).
    image_channels: channels of the input and output images.
    image_size: input height = width; divisible by 2**(len(channel_mult) - 1).
    conv_impl: 'xla' (native convolutions; GPU/TPU) or 'im2col' (patches @ kernel, same values;
        on CPU, where XLA's convolution gradients are 10-40x slower inside loops).
    """
    channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16, )
    num_heads: int = 1
    dropout: float = 0.0
    groups: int = 32
    lora_alpha: float = 16.0
    image_channels: int = 3
    image_size: int = 32
    conv_impl: str = 'xla'
    section: dataclasses.InitVar[str] = ''

    def __post_init__(self, section: str):
        """Checks every field: positive ints, channels even and divided by groups and num_heads,
        dropout in [0, 1), lora_alpha > 0, a known conv_impl, image_size a multiple of
        2**(levels-1) and attn_resolutions among the levels' sizes."""
        # Tuples keep the config hashable (linen module attributes) whatever the caller passed.
        object.__setattr__(self, 'channel_mult', tuple(self.channel_mult))
        object.__setattr__(self, 'attn_resolutions', tuple(self.attn_resolutions))

        def pos_int(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        s = section

        if not pos_int(self.channels) or self.channels % 2:
            raise ValueError(f'{s}channels must be an even int >= 2, got {self.channels!r}')
        if not self.channel_mult or not all(pos_int(m) for m in self.channel_mult):
            raise ValueError(f'{s}channel_mult must be a non-empty sequence of ints >= 1, '
                             f'got {self.channel_mult!r}')
        if not pos_int(self.num_res_blocks):
            raise ValueError(f'{s}num_res_blocks must be an int >= 1, got {self.num_res_blocks!r}')
        if not pos_int(self.groups) or self.channels % self.groups:
            raise ValueError(f'{s}groups must be an int >= 1 dividing {s}channels '
                             f'({self.channels}), got {self.groups!r}')
        if not pos_int(self.num_heads) or self.channels % self.num_heads:
            raise ValueError(f'{s}num_heads must be an int >= 1 dividing {s}channels '
                             f'({self.channels}), got {self.num_heads!r}')
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f'{s}dropout must be a number in [0, 1), got {d!r}')
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f'{s}lora_alpha must be a number > 0, got {self.lora_alpha!r}')
        if not pos_int(self.image_channels):
            raise ValueError(f'{s}image_channels must be an int >= 1, got {self.image_channels!r}')
        if self.conv_impl not in layers.CONV_IMPLS:
            raise ValueError(f'{s}conv_impl must be one of {layers.CONV_IMPLS}, '
                             f'got {self.conv_impl!r}')
        factor = 2**(len(self.channel_mult) - 1)
        if not pos_int(self.image_size) or self.image_size % factor:
            raise ValueError(f'{s}image_size must be a positive multiple of {factor} '
                             f'(2**(levels-1)), got {self.image_size!r}')
        sizes = self.resolutions()
        if not all(r in sizes for r in self.attn_resolutions):
            raise ValueError(f'{s}attn_resolutions must be a subset of {sizes}, '
                             f'got {self.attn_resolutions!r}')

    def resolutions(self) -> tuple[int, ...]:
        """Spatial size of each level: image_size / 2**l."""
        return tuple(self.image_size // 2**l for l in range(len(self.channel_mult)))


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [N, dim] of integer timesteps t [N] (dim even).

    emb[n, j] = sin(t_n w_j), emb[n, dim/2 + j] = cos(t_n w_j), w_j = 10000^(-j / (dim/2 - 1)).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
    """h = conv1(silu(gn(x))) + temb(silu(emb)); out = skip(x) + conv2(drop(silu(gn(h)))).

    drop: inverted dropout of rate p (kept units scaled by 1 / (1 - p)) when ``train`` and p > 0,
    else the identity. Shapes: x [N, H, W, in], emb [N, E] -> [N, H, W, features].
    """
    features: int
    groups: int
    lora_alpha: float
    conv_impl: str = 'xla'
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda f, k, name: layers.Conv(f, (k, k),
                                              lora_alpha=self.lora_alpha,
                                              impl=self.conv_impl,
                                              kernel_init=_INIT,
                                              name=name)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name='norm1')(x))
        h = conv(self.features, 3, 'conv1')(h)
        # Time conditioning is a per-channel shift, broadcast over space.
        t = layers.Dense(self.features, lora_alpha=self.lora_alpha, kernel_init=_INIT,
                         name='temb')(nn.silu(emb))
        h = h + t[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name='norm2')(h))
        if self.dropout > 0:  # no op at all for p = 0: the same program as without dropout
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.features, 3, 'conv2')(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, 'skip')(x)
        return x + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    q, k, v = gn(x) W_{q,k,v}; out = x + softmax(q k^T / sqrt(d)) v W_o, per head of width
    d = C / num_heads. Shapes: x [N, H, W, C] -> [N, H, W, C].
    """
    num_heads: int
    groups: int
    lora_alpha: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hgt, wid, c = x.shape
        d = c // self.num_heads
        dense = lambda name: layers.Dense(
            c, lora_alpha=self.lora_alpha, kernel_init=_INIT, name=name)
        h = nn.GroupNorm(self.groups, epsilon=1e-6, name='norm')(x).reshape(n, hgt * wid, c)
        q, k, v = (dense(name)(h).reshape(n, hgt * wid, self.num_heads, d) for name in 'qkv')
        logits = jnp.einsum('nqhd,nkhd->nhqk', q, k) / math.sqrt(d)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, hgt * wid, c)
        return x + dense('o')(out).reshape(n, hgt, wid, c)


class UNet(nn.Module):
    """eps_hat = UNet(x_t, t). Shapes: x [N, S, S, image_channels] float32, t [N] int -> like x.

    Frozen weights live in ``params``; optional adapters in ``lora`` (same module paths):
    ``model.apply({'params': frozen, 'lora': adapters}, x, t)``. ``train=True`` turns on the
    residual blocks' dropout (config.dropout > 0), drawn from the ``'dropout'`` rng collection:
    ``model.apply(variables, x, t, train=True, rngs={'dropout': key})``; evaluation and sampling
    use the default ``train=False`` and are deterministic.
    """
    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.image_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f'image_size/image_channels expect x of shape [N, '
                             f'{", ".join(map(str, want))}], got {tuple(x.shape)}')
        if t.shape != x.shape[:1]:
            raise ValueError(f'UNet timesteps t must have shape [N]={x.shape[:1]}, got {t.shape}')
        alpha, groups = cfg.lora_alpha, cfg.groups

        def res(f, name):
            block = ResBlock(f, groups, alpha, cfg.conv_impl, cfg.dropout, name=name)
            return lambda h, emb: block(h, emb, train)

        def attn(name):
            return AttnBlock(cfg.num_heads, groups, alpha, name=name)

        def conv(f, name, strides=(1, 1), init=_INIT):
            return layers.Conv(f, (3, 3),
                               strides=strides,
                               lora_alpha=alpha,
                               impl=cfg.conv_impl,
                               kernel_init=init,
                               name=name)

        width = 4 * cfg.channels
        emb = timestep_embedding(t, cfg.channels)
        emb = layers.Dense(width, lora_alpha=alpha, kernel_init=_INIT, name='temb_0')(emb)
        emb = layers.Dense(width, lora_alpha=alpha, kernel_init=_INIT, name='temb_1')(nn.silu(emb))

        h = conv(cfg.channels, 'conv_in')(x)
        skips = [h]
        last = len(cfg.channel_mult) - 1
        for lvl, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                h = res(cfg.channels * mult, f'down{lvl}_{i}_res')(h, emb)
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn(f'down{lvl}_{i}_attn')(h)
                skips.append(h)
            if lvl != last:
                # SAME padding with stride 2 halves an even size exactly.
                h = conv(h.shape[-1], f'down{lvl}_downsample', strides=(2, 2))(h)
                skips.append(h)

        h = res(h.shape[-1], 'mid_0_res')(h, emb)
        h = attn('mid_attn')(h)
        h = res(h.shape[-1], 'mid_1_res')(h, emb)

        for lvl in reversed(range(len(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(cfg.channels * cfg.channel_mult[lvl], f'up{lvl}_{i}_res')(h, emb)
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn(f'up{lvl}_{i}_attn')(h)
            if lvl != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = conv(h.shape[-1], f'up{lvl}_upsample')(h)

        h = nn.silu(nn.GroupNorm(groups, epsilon=1e-6, name='norm_out')(h))
        return conv(cfg.image_channels, 'conv_out', init=_HEAD_INIT)(h)


def _init_fn(config: UNetConfig):
    """rng -> params, tracing ``UNet(config).init`` on a zero batch of one."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.image_channels), jnp.float32)
    t = jnp.zeros((1, ), jnp.int32)
    return lambda rng: UNet(config).init(rng, x, t)['params']


def init_params(config: UNetConfig, rng: jax.Array) -> dict:
    """Frozen-backbone ``params`` collection for ``UNet(config)``; call it outside jit.

    Runs once, so it is compiled without backend optimisation: on CPU, optimising the
    unrolled threefry code of ~100 initializers takes 3-4x longer than running it unoptimised.
    """
    init = jax.jit(_init_fn(config), compiler_options={'xla_backend_optimization_level': 0})
    return init(rng)


def param_shapes(config: UNetConfig) -> dict:
    """The params tree of ``UNet(config)`` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    return jax.eval_shape(_init_fn(config), jax.random.key(0))
