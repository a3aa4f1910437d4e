"""LoRA-aware linen layers shared by every fedgen model, and the scan over stacked blocks.

A layer owns its frozen weights in the ``params`` collection and *optionally* reads a low-rank
adapter from the ``lora`` collection at the same module path (``{'a': A, 'b': B}``). When the
adapter is present the layer computes the unmerged LoRA update

    y = x W0 + b + (alpha / r) * (x A) B

and otherwise exactly ``x W0 + b``. Adapters are created by :func:`fedgen.lora.adapters.init`,
never by the
layer, so the frozen tree and the adapter tree stay separate pytrees.

A decoder's L identical blocks are one module run by :func:`scan_blocks`: every leaf of the block's
``params`` and ``lora`` collections carries a leading layer axis (kernel [L, in, out], adapter
A [L, in, r], B [L, r, out]) and the block body is traced and compiled once, whatever L.
:func:`stack_blocks` / :func:`unstack_blocks` convert between that layout and per-layer subtrees
(``layers_0``, ``layers_1``, ... as checkpoint files name them).
"""
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedgen.lora import adapters as lora

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


# XLA's pass that hoists loop-invariant work out of while loops (the scan over blocks).
LOOP_HOIST_PASS = 'while-loop-invariant-code-motion'


def compiler_options(dtype: str) -> dict:
    """jax.jit's ``compiler_options`` for a program whose scanned blocks hold ``dtype`` weights.

    XLA:CPU computes bfloat16 dots in float32, so each layer's kernels are converted; the hoisting
    pass then moves those converts out of the layer loop, which materializes a float32 copy of
    every stacked kernel (2x the bf16 weights, 1.39x float32's whole memory on SmolLM2-135M).
    For bf16 on CPU this disables that pass, so one layer's float32 kernels exist at a time;
    otherwise (float32, or a GPU/TPU with native bf16 dots) it returns {}.
    """
    if dtype == 'bfloat16' and jax.default_backend() == 'cpu':
        return {'xla_disable_hlo_passes': LOOP_HOIST_PASS}
    return {}


def scan_blocks(block: type[nn.Module], n_layer: int, remat: bool, in_axes: tuple) -> type:
    """``block`` run as a scan over ``n_layer`` layers (``nn.scan`` over the layer axis).

    The block's signature is (carry, *args) -> (carry, out); ``in_axes`` gives, per arg,
    ``nn.broadcast`` (the same value for every layer) or 0 (sliced per layer, e.g. a KV cache
    [L, ...]); outs are stacked on a leading L axis. ``params`` and ``lora`` are stacked on axis 0
    and the init rng is split per layer.

    What the backward pass keeps per layer (both wrap the block in ``jax.checkpoint``):
    - ``remat=False``: the outputs of the matmuls without batch dimensions (the projections
      x W0 and the adapters' x A, (x A) B), ``dots_with_no_batch_dims_saveable``; the
      element-wise work (norms, RoPE, SiLU, softmax) and attention's batched einsums are
      recomputed from them. On SmolLM2-135M (30 blocks, B = 2 x T = 128, f32) this halves the
      backward's residuals (XLA temp 393 -> 195 MiB) and makes the step about 4% faster than
      keeping every intermediate;
    - ``remat=True``: only the layer's input; the whole block is recomputed.
    """
    # inside a scan, the loop already stops CSE across the recompute
    policy = None if remat else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    block = nn.remat(block, prevent_cse=False, policy=policy)
    return nn.scan(block,
                   variable_axes={
                       'params': 0,
                       'lora': 0
                   },
                   split_rngs={'params': True},
                   in_axes=in_axes,
                   length=n_layer)


def stack_blocks(tree: dict, prefix: str, name: str, field: str = 'layers') -> dict:
    """{prefix0: t_0, ..., prefix{L-1}: t_{L-1}, other...} -> {name: t (leaves [L, ...]), other...}.

    Every t_i must hold the same leaves with the same shapes, and the layers must be numbered
    0..L-1; otherwise a one-line ValueError names ``field`` and the first difference. numpy leaves
    stay numpy (a host-side loader's arrays), others become jax arrays.
    """
    pat = re.compile(re.escape(prefix) + r'(\d+)$')
    ids = sorted(int(m[1]) for k in tree if (m := pat.match(k)))
    if not ids:
        return dict(tree)
    if ids != list(range(len(ids))):
        missing = min(set(range(ids[-1] + 1)) - set(ids))
        raise ValueError(f'{field}: {prefix}{missing} is missing (stacked layers must be '
                         f'0..{ids[-1]}, every one present)')
    flats = [traverse_util.flatten_dict(tree[f'{prefix}{i}']) for i in ids]
    for i, flat in zip(ids, flats):
        for k in flats[0].keys() | flat.keys():
            shapes = [str(np.shape(f[k])) if k in f else 'absent' for f in (flats[0], flat)]
            if shapes[0] != shapes[1]:
                raise ValueError(f'{field}: {prefix}{i}/{"/".join(k)} is {shapes[1]} but '
                                 f'{prefix}0 has {shapes[0]} (stacked layers need the same leaves '
                                 'and shapes)')
    numpy = isinstance(next(iter(flats[0].values())), np.ndarray)
    stack = np.stack if numpy else jnp.stack
    out = {k: v for k, v in tree.items() if not pat.match(k)}
    out[name] = traverse_util.unflatten_dict({k: stack([f[k] for f in flats]) for k in flats[0]})
    return out


def unstack_blocks(tree: dict, name: str, prefix: str) -> dict:
    """Inverse of :func:`stack_blocks`: {name: t (leaves [L, ...])} -> {prefix{i}: t[i]}."""
    if name not in tree:
        return dict(tree)
    out = {k: v for k, v in tree.items() if k != name}
    n = jax.tree.leaves(tree[name])[0].shape[0]
    for i in range(n):
        out[f'{prefix}{i}'] = jax.tree.map(lambda x, i=i: x[i], tree[name])
    return out
