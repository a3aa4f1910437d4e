"""InceptionV3 pool3 features for FID (the FID variant of the TF 2015-12-05 Inception graph).

This is the network behind the standard FID number: torchvision's InceptionV3 layout with the
changes that make it reproduce the original TensorFlow graph (as in pytorch-fid):
  * avg-pool branches of the A (Mixed_5*), C (Mixed_6b..e) and first E (Mixed_7b) blocks use
    count_include_pad=False (TF 'SAME' average pooling divides by the valid count);
  * the last E block (Mixed_7c) pools its pool branch with a 3x3 *max* pool, not an average;
  * BatchNorm eps = 1e-3, in inference form (frozen running statistics);
  * no auxiliary head; the output is the 2048-d global average of Mixed_7c ("pool3").

Input: images [N, H, W, 3], either uint8 in [0, 255] or float in [-1, 1] (the project's model
convention). They are mapped to [-1, 1] and resized to 299x299 with bilinear interpolation
(half-pixel centres, no antialiasing: torch's align_corners=False). Output: features [N, 2048].

Weights file format (`load_params`): a numpy `.npz` archive whose keys are the '/'-joined paths
of the flax variables, collection first, e.g.
    params/Conv2d_1a_3x3/conv/kernel        [3, 3, 3, 32]   (HWIO)
    params/Mixed_5b/branch1x1/bn/scale      [64]
    params/Mixed_5b/branch1x1/bn/bias       [64]
    batch_stats/Mixed_5b/branch1x1/bn/mean  [64]
    batch_stats/Mixed_5b/branch1x1/bn/var   [64]
Module names follow torchvision (Mixed_6b/branch7x7dbl_3/...), so converting the public
pytorch-fid state_dict is a rename plus a kernel transpose: see experiments/convert_inception.py.
Inception-v3 weights are not shipped with fedgen; without them use the classifier Fréchet distance
(fedgen.metrics.classifier), which is NOT FID.
"""
import functools
import os
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, frozen) -> ReLU. x [N, H, W, C] -> [N, H', W', F]."""
    features: int
    kernel: Sequence[int] = (1, 1)
    strides: Sequence[int] = (1, 1)
    pad: Sequence[int] = (0, 0)  # symmetric zero padding (rows, cols), as torch's `padding`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((self.pad[0], self.pad[0]), (self.pad[1], self.pad[1]))
        # HIGHEST keeps float32 convs out of TF32 on GPUs: FID is sensitive to feature precision.
        x = nn.Conv(self.features,
                    tuple(self.kernel),
                    tuple(self.strides),
                    padding=padding,
                    use_bias=False,
                    precision=jax.lax.Precision.HIGHEST,
                    name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over valid pixels only (count_include_pad=False, like TF 'SAME')."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): C -> 224 + pool_features channels."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name='branch1x1')(x)
        b5 = BasicConv(48, name='branch5x5_1')(x)
        b5 = BasicConv(64, (5, 5), pad=(2, 2), name='branch5x5_2')(b5)
        bd = BasicConv(64, name='branch3x3dbl_1')(x)
        bd = BasicConv(96, (3, 3), pad=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv(96, (3, 3), pad=(1, 1), name='branch3x3dbl_3')(bd)
        bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, bd, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35x288 -> 17x17x768."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), (2, 2), name='branch3x3')(x)
        bd = BasicConv(64, name='branch3x3dbl_1')(x)
        bd = BasicConv(96, (3, 3), pad=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv(96, (3, 3), (2, 2), name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17x768 -> 17x17x768) with factorised 1x7 / 7x1 convolutions."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), pad=(0, 3)), dict(kernel=(7, 1), pad=(3, 0))
        b1 = BasicConv(192, name='branch1x1')(x)
        b7 = BasicConv(c7, name='branch7x7_1')(x)
        b7 = BasicConv(c7, **row, name='branch7x7_2')(b7)
        b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
        bd = BasicConv(c7, name='branch7x7dbl_1')(x)
        bd = BasicConv(c7, **col, name='branch7x7dbl_2')(bd)
        bd = BasicConv(c7, **row, name='branch7x7dbl_3')(bd)
        bd = BasicConv(c7, **col, name='branch7x7dbl_4')(bd)
        bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
        bp = BasicConv(192, name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17x768 -> 8x8x1280."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name='branch3x3_1')(x)
        b3 = BasicConv(320, (3, 3), (2, 2), name='branch3x3_2')(b3)
        b7 = BasicConv(192, name='branch7x7x3_1')(x)
        b7 = BasicConv(192, (1, 7), pad=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv(192, (7, 1), pad=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv(192, (3, 3), (2, 2), name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c (8x8 -> 8x8x2048); `max_pool` selects the FID Mixed_7c pool branch."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), pad=(0, 1)), dict(kernel=(3, 1), pad=(1, 0))
        b1 = BasicConv(320, name='branch1x1')(x)
        b3 = BasicConv(384, name='branch3x3_1')(x)
        b3 = jnp.concatenate([
            BasicConv(384, **row, name='branch3x3_2a')(b3),
            BasicConv(384, **col, name='branch3x3_2b')(b3)
        ],
                             axis=-1)
        bd = BasicConv(448, name='branch3x3dbl_1')(x)
        bd = BasicConv(384, (3, 3), pad=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([
            BasicConv(384, **row, name='branch3x3dbl_3a')(bd),
            BasicConv(384, **col, name='branch3x3dbl_3b')(bd)
        ],
                             axis=-1)
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
        bp = BasicConv(192, name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """x [N, 299, 299, 3] in [-1, 1] -> pool3 features [N, 2048]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv(32, (3, 3), (2, 2), name='Conv2d_1a_3x3')(x)  # 149
        x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # 147
        x = BasicConv(64, (3, 3), pad=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_down(x)  # 73
        x = BasicConv(80, name='Conv2d_3b_1x1')(x)
        x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # 71
        x = _max_pool_down(x)  # 35
        x = InceptionA(32, name='Mixed_5b')(x)
        x = InceptionA(64, name='Mixed_5c')(x)
        x = InceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)  # 17
        x = InceptionC(128, name='Mixed_6b')(x)
        x = InceptionC(160, name='Mixed_6c')(x)
        x = InceptionC(160, name='Mixed_6d')(x)
        x = InceptionC(192, name='Mixed_6e')(x)
        x = InceptionD(name='Mixed_7a')(x)  # 8
        x = InceptionE(name='Mixed_7b')(x)
        x = InceptionE(max_pool=True, name='Mixed_7c')(x)
        return jnp.mean(x, axis=(1, 2))


@functools.lru_cache(maxsize=1)
def expected_shapes() -> Dict[str, Tuple[int, ...]]:
    """{'/'-joined variable path: shape} of every array in the weights file (shape-only trace)."""
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), dummy)
    flat = traverse_util.flatten_dict(variables, sep='/')
    return {k: tuple(v.shape) for k, v in sorted(flat.items())}


def save_params(variables, path: str) -> None:
    """Writes {'params': ..., 'batch_stats': ...} to `path` in the .npz format of this module."""
    flat = traverse_util.flatten_dict(variables, sep='/')
    with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare path
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_params(path: str, *, field: str = 'path'):
    """Reads and validates an InceptionV3 FID weights `.npz` (format in the module docstring).

    Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays (~95 MB; jax.device_put
    them once before many `features` calls). Raises a one-line ValueError naming ``field`` (the
    name errors give ``path``; the caller's, e.g. 'metrics.inception_path') if the file is
    missing or any expected key is absent, unexpected or of the wrong shape.
    """
    if not path or not os.path.isfile(path):
        raise ValueError(f'{field}: no InceptionV3 .npz weights file at {path!r}')
    want = expected_shapes()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    missing = sorted(set(want) - set(arrays))
    extra = sorted(set(arrays) - set(want))
    bad = [k for k in sorted(set(want) & set(arrays)) if arrays[k].shape != want[k]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing keys (first {missing[0]!r})')
        if extra:
            parts.append(f'{len(extra)} unexpected keys (first {extra[0]!r})')
        if bad:
            parts.append(f'{len(bad)} wrong shapes (first {bad[0]!r}: '
                         f'{arrays[bad[0]].shape} != {want[bad[0]]})')
        raise ValueError(f'{field}: {path!r} is not an InceptionV3 FID weights file: ' +
                         '; '.join(parts))
    flat = {k: arrays[k].astype(np.float32) for k in want}
    return traverse_util.unflatten_dict(flat, sep='/')


def _preprocess(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] images [N, H, W, 3] -> float32 [N, 299, 299, 3], [-1, 1]."""
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 127.5 - 1.0  # = 2 * (u / 255) - 1
    else:
        x = images.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        shape = (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
        # antialias=False: plain bilinear, matching torch's interpolate(align_corners=False).
        x = jax.image.resize(x, shape, 'bilinear', antialias=False)
    return x


@jax.jit
def _features(variables, images):
    return InceptionV3().apply(variables, _preprocess(images))


def features(variables, images) -> jax.Array:
    """Pool3 features [N, 2048] (float32) of images [N, H, W, 3] (uint8 or float in [-1, 1]).

    `variables` is the tree returned by `load_params`. One jitted call per distinct batch shape;
    the caller streams large sets in fixed-size batches (and feeds fedgen.metrics.frechet).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f'images must have shape [N, H, W, 3], got {images.shape}')
    return _features(variables, images)
