"""A small CNN classifier whose features give `fd_classifier`, the offline stand-in for FID.

Inception-v3 weights are not available offline, so image quality can also be measured as the
Fréchet distance between Gaussians fitted to the feature-layer activations of this classifier,
trained here on the real data. The number is called `fd_classifier` and is NOT comparable to FID.

Network (x [N, H, W, 3] in [-1, 1], typically 32x32):
    conv3x3(w0) -> ReLU -> conv3x3(w1, stride 2) -> ReLU -> ... (strides 1, 2, 2, 1, ...)
    -> global average pool [N, w_last] -> Dense(D) -> ReLU  = features [N, D]
    -> Dense(num_classes)                                   = logits   [N, num_classes]
Images are uint8 in [0, 255] (mapped by u / 127.5 - 1) or float in [-1, 1].

Parameters are the plain flax tree {'params': ...}; the architecture (widths, D, num_classes) is
read back from the parameter shapes, so no config travels with them. All functions are pure;
caching the trained classifier on disk is the caller's business.
"""
import functools
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen.metrics import frechet
from fedgen.models import layers


class SmallCNN(nn.Module):
    """x [N, H, W, 3] -> (features [N, feature_dim], logits [N, num_classes])."""
    widths: Tuple[int, ...]
    feature_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        for i, width in enumerate(self.widths):
            stride = 2 if i % 3 in (1, 2) else 1  # 32 -> 32 -> 16 -> 8 -> 8 for four layers
            # im2col: the training loop is a lax.scan, where XLA:CPU's own conv gradients are
            # 10-40x slower (docs/performance.md); the values are the same.
            conv = layers.Conv(width, (3, 3), (stride, stride), impl='im2col', name=f'conv_{i}')
            x = nn.relu(conv(x))
        feats = nn.relu(nn.Dense(self.feature_dim, name='feature')(jnp.mean(x, axis=(1, 2))))
        return feats, nn.Dense(self.num_classes, name='logits')(feats)


def _arch(params) -> SmallCNN:
    """The module that owns `params` (widths, D and num_classes read from the shapes)."""
    p = params['params']
    n_conv = sum(1 for k in p if k.startswith('conv_'))
    widths = tuple(int(p[f'conv_{i}']['kernel'].shape[-1]) for i in range(n_conv))
    return SmallCNN(widths, int(p['feature']['kernel'].shape[-1]),
                    int(p['logits']['kernel'].shape[-1]))


def _to_float(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def _check_images(images, name: str = 'images') -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f'{name} must have shape [N, H, W, 3], got {images.shape}')


def init(rng: jax.Array,
         num_classes: int,
         feature_dim: int = 128,
         widths: Sequence[int] = (32, 64, 128, 128),
         image_size: int = 32,
         *,
         section: str = ''):
    """Fresh parameters {'params': ...} for `num_classes` classes and a D = feature_dim layer.
    Checks num_classes >= 2 and feature_dim and widths >= 1; section: the caller's prefix for
    the names in error messages, e.g. 'metrics.classifier.'."""
    if num_classes < 2:
        raise ValueError(f'{section}num_classes must be >= 2, got {num_classes}')
    if feature_dim < 1 or not widths or min(widths) < 1:
        raise ValueError(f'{section}feature_dim and widths must be >= 1')
    module = SmallCNN(tuple(int(w) for w in widths), int(feature_dim), int(num_classes))
    dummy = jax.ShapeDtypeStruct((1, int(image_size), int(image_size), 3), jnp.float32)
    shapes = jax.eval_shape(module.init, rng, dummy)  # shape-only trace, no compile
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    return jax.tree_util.tree_unflatten(treedef, _lecun_init(tuple(x.shape for x in leaves), rng))


@functools.partial(jax.jit, static_argnums=0)
def _lecun_init(shapes: Tuple[Tuple[int, ...], ...], rng: jax.Array):
    """Kernels ~ N(0, 1 / fan_in) (fan_in = prod of all but the last axis), biases 0.

    All kernels are slices of ONE normal draw: XLA:CPU spends ~0.3-1 s compiling each separate
    random call, which made flax's per-parameter initialisers take ~10 s for this tiny net.
    """
    sizes = [int(np.prod(s)) for s in shapes if len(s) > 1]
    flat = jax.random.normal(rng, (sum(sizes), ), jnp.float32)
    out, offset = [], 0
    for shape in shapes:
        if len(shape) == 1:
            out.append(jnp.zeros(shape, jnp.float32))
            continue
        size = int(np.prod(shape))
        fan_in = size // shape[-1]
        out.append(flat[offset:offset + size].reshape(shape) / np.sqrt(fan_in))
        offset += size
    return out


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: SmallCNN, params, images):
    return module.apply(params, _to_float(images))


def _batches(params, images, batch_size: int, which: int):
    """Yields outputs[which] per batch, padded to one batch size so one compile serves any N."""
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    module, n = _arch(params), images.shape[0]
    batch_size = min(batch_size, n)
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        yield np.asarray(_apply(module, params, chunk)[which])[:batch_size - pad]


def features(params, images, batch_size: int = 500) -> np.ndarray:
    """Feature-layer activations [N, D] (float32) of images [N, H, W, 3] (uint8 or [-1, 1])."""
    return np.concatenate(list(_batches(params, images, batch_size, which=0)))


def logits(params, images, batch_size: int = 500) -> np.ndarray:
    """Class logits [N, num_classes] of images [N, H, W, 3]."""
    return np.concatenate(list(_batches(params, images, batch_size, which=1)))


def accuracy(params, images, labels, batch_size: int = 500) -> float:
    """Fraction of images whose argmax logit equals the integer label [N]."""
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(f'labels must have shape [{images.shape[0]}], got {labels.shape}')
    return float(np.mean(np.argmax(logits(params, images, batch_size), axis=-1) == labels))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(module: SmallCNN, steps: int, batch_size: int, params, images, labels, lr, key):
    """`steps` Adam steps with cosine decay on random mini-batches (with flips), one lax.scan."""
    tx = optax.adam(optax.cosine_decay_schedule(1.0, steps))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        _, out = module.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    def step(carry, step_key):
        p, s = carry
        k_idx, k_flip = jax.random.split(step_key)
        idx = jax.random.randint(k_idx, (batch_size, ), 0, images.shape[0])
        x = _to_float(images[idx])
        # Random horizontal flips: label-preserving for natural images, cheap regularisation.
        flip = jax.random.bernoulli(k_flip, 0.5, (batch_size, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
        grads = jax.grad(loss_fn)(p, x, labels[idx])
        updates, s = tx.update(grads, s, p)
        # The schedule runs from 1 to 0; scaling by lr here keeps lr a traced (no-recompile) value.
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params


def train(images_uint8,
          labels,
          num_classes: int,
          steps: int,
          batch_size: int,
          lr: float,
          seed: int,
          feature_dim: int = 128,
          widths: Sequence[int] = (32, 64, 128, 128),
          *,
          section: str = ''):
    """Trains a fresh classifier; returns params {'params': ...}. Deterministic given `seed`.

    images_uint8 [N, H, W, 3] (uint8 or float in [-1, 1]), labels [N] ints in [0, num_classes).
    Minimises the mean softmax cross-entropy with Adam, lr * cosine decay over `steps`, on
    batches drawn uniformly with replacement. The whole loop is one jitted lax.scan; the data
    set is an argument of that jit (moved to the device once), never a baked-in constant.
    Checks the images' shape, labels [N] in [0, num_classes), steps, batch_size >= 1 and lr > 0
    (and :func:`init`'s sizes); section: the caller's prefix for the names in error messages,
    e.g. 'metrics.classifier.'.
    """
    _check_images(images_uint8, 'images_uint8')
    labels = np.asarray(labels)
    if labels.shape != images_uint8.shape[:1]:
        raise ValueError(f'labels must have shape [{images_uint8.shape[0]}], got {labels.shape}')
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must lie in [0, {section}num_classes={num_classes})')
    if steps < 1 or batch_size < 1:
        raise ValueError(f'{section}steps and {section}batch_size must be >= 1, got {steps}, '
                         f'{batch_size}')
    if not lr > 0:
        raise ValueError(f'{section}lr must be > 0, got {lr}')
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    params = init(init_key,
                  num_classes,
                  feature_dim,
                  widths,
                  images_uint8.shape[1],
                  section=section)
    return _train(_arch(params), int(steps), int(batch_size), params, jnp.asarray(images_uint8),
                  jnp.asarray(labels, jnp.int32), jnp.float32(lr), train_key)


def feature_stats(params, images, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of the classifier features of `images`, streamed in batches."""
    return frechet.stream_stats(_batches(params, images, batch_size, which=0),
                                _arch(params).feature_dim)


def fd_classifier(params,
                  real_stats: Tuple[np.ndarray, np.ndarray],
                  fake_images,
                  batch_size: int = 500) -> float:
    """Fréchet distance of `fake_images` [N, H, W, 3] features to real_stats = (mu, sigma).

    real_stats usually comes from `feature_stats(params, real_images)`, cached by the caller.
    """
    mu_real, sigma_real = real_stats
    mu_fake, sigma_fake = feature_stats(params, fake_images, batch_size)
    return frechet.frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
