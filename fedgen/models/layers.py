"""LoRA-aware linen layers shared by every fedgen model.

A layer owns its frozen weights in the ``params`` collection and *optionally* reads a low-rank
adapter from the ``lora`` collection at the same module path (``{'a': A, 'b': B}``). When the
adapter is present the layer computes the unmerged LoRA update

    y = x W0 + b + (alpha / r) * (x A) B

and otherwise exactly ``x W0 + b``. Adapters are created by :func:`fedgen.lora.init`, never by the
layer, so the frozen tree and the adapter tree stay separate pytrees.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgen import lora

Initializer = Callable[..., Any]


class Dense(nn.Module):
    """Dense y = x W0 + b (+ LoRA). Shapes: x [..., in], W0 [in, out], A [in, r], B [r, out]."""
    features: int
    use_bias: bool = True
    lora_alpha: float = 16.0
    kernel_init: Initializer = nn.initializers.normal(0.02)
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
        y = x @ kernel
        if self.has_variable('lora', 'a'):
            a = self.get_variable('lora', 'a').astype(x.dtype)  # f32 adapters, x's compute dtype
            b = self.get_variable('lora', 'b').astype(x.dtype)
            y = y + lora.scale(self.lora_alpha, a) * ((x @ a) @ b)
        if self.use_bias:
            y = y + self.param('bias', self.bias_init, (self.features, ))
        return y


CONV_IMPLS = ('xla', 'im2col')


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
    """The same convolution as XLA's, as patches @ kernel.

    x [N, H, W, in] is padded exactly as XLA pads ('SAME'/'VALID'), its kh*kw shifted (strided)
    views are concatenated on the channel axis into [N, H', W', kh*kw*in], and multiplied by the
    kernel reshaped to [kh*kw*in, out]. Gradients are slices and matmuls, which XLA:CPU runs at full
    speed inside loops (lax.scan / lax.map), where its native convolution gradients run 10-40x
    slower than outside them (measured; see docs/performance.md).
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (sh, sw), padding)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    views = [
        xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :] for i in range(kh)
        for j in range(kw)
    ]
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return cols @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """NHWC convolution with an optional rank-r LoRA factorisation over channels.

    Shapes: x [N, H, W, in], W0 [kh, kw, in, out], A [kh, kw, in, r], B [r, out]. The update is
    conv(x, A) B, i.e. delta W[h, w, i, o] = sum_r A[h, w, i, r] B[r, o]. ``impl`` picks XLA's
    native convolution ('xla', best on GPU/TPU) or :func:`im2col_conv` ('im2col', the same values,
    best on CPU where training steps run inside loops).
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str = 'SAME'
    use_bias: bool = True
    lora_alpha: float = 16.0
    impl: str = 'xla'
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if self.impl == 'im2col':
            return im2col_conv(x, kernel, tuple(self.strides), self.padding)
        return jax.lax.conv_general_dilated(x,
                                            kernel,
                                            tuple(self.strides),
                                            self.padding,
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param('kernel', self.kernel_init, shape)
        y = self._conv(x, kernel)
        if self.has_variable('lora', 'a'):
            a = self.get_variable('lora', 'a')
            b = self.get_variable('lora', 'b')
            y = y + lora.scale(self.lora_alpha, a) * (self._conv(x, a) @ b)
        if self.use_bias:
            y = y + self.param('bias', self.bias_init, (self.features, ))
        return y


def layer_norm(name: str, eps: float = 1e-5) -> nn.LayerNorm:
    """LayerNorm with HF-compatible epsilon; params ``scale`` [D], ``bias`` [D]."""
    return nn.LayerNorm(epsilon=eps, name=name)


def causal_mask(t: int) -> jax.Array:
    """Boolean [1, 1, T, T] lower-triangular mask (query i attends to keys j <= i)."""
    return jnp.tril(jnp.ones((t, t), bool))[None, None]
