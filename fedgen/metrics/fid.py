"""FID: the Fréchet distance between Gaussians fitted to InceptionV3 pool3 features.

    FID = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})

where (mu, S) are the mean [2048] and unbiased covariance [2048, 2048] of the pool3 features
(fedgen.metrics.inception) of the reference images r and the generated images g (Heusel et al.
2017). The features are streamed through one jitted network call per fixed-size batch into the
float64 sufficient statistics of fedgen.metrics.frechet, so no feature matrix is held in memory.

Images are [N, H, W, 3], uint8 in [0, 255] or float in [-1, 1]; the network resizes them to
299x299 itself. `variables` is the tree from `inception.load_params` (or any tree of the same
structure, e.g. random weights in tests).

The number equals the standard FID only with the converted pytorch-fid weights (see
experiments/convert_inception.py), and is comparable to published values only for the same
reference set and sample count (FID is biased upward for small N).
"""
from typing import Iterator, Tuple

import numpy as np

from fedgen.metrics import frechet, inception


def _feature_batches(variables, images, batch_size: int) -> Iterator[np.ndarray]:
    """Pool3 features [b, 2048] per batch; the last batch is padded so one compile serves all."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f'images must have shape [N, H, W, 3] with N >= 1, got {images.shape}')
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f'FID batch_size must be an integer >= 1, got {batch_size!r}')
    n = images.shape[0]
    batch_size = min(int(batch_size), n)
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        pad = batch_size - chunk.shape[0]
        if pad:  # repeat the last image; its features are dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        yield np.asarray(inception.features(variables, chunk))[:batch_size - pad]


def inception_features(variables, images, batch_size: int = 50) -> np.ndarray:
    """Pool3 features [N, 2048] (float32) of images [N, H, W, 3], computed in batches."""
    return np.concatenate(list(_feature_batches(variables, images, batch_size)))


def inception_stats(variables, images, batch_size: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) float64 of the pool3 features of images [N >= 2, ...]."""
    return frechet.stream_stats(_feature_batches(variables, images, batch_size),
                                inception.FEATURE_DIM)


def fid(variables,
        reference_stats: Tuple[np.ndarray, np.ndarray],
        generated_images,
        batch_size: int = 50) -> float:
    """FID of `generated_images` [N, H, W, 3] against reference_stats = (mu_r, sigma_r).

    reference_stats usually comes from `inception_stats(variables, real_images)`, computed once
    by the caller and reused for every evaluation.
    """
    mu_r, sigma_r = reference_stats
    mu_g, sigma_g = inception_stats(variables, generated_images, batch_size)
    return frechet.frechet_distance(mu_r, sigma_r, mu_g, sigma_g)
