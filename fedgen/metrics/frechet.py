"""Fréchet distance between Gaussians fitted to feature sets (the statistic behind FID).

Two feature sets are summarised by their mean and covariance, and compared by the Fréchet (2-
Wasserstein) distance between N(mu1, S1) and N(mu2, S2):

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

Statistics are accumulated in a streaming way so that features can be produced batch by batch by
a jitted network and never held in memory all at once:

    state = init_stats(D)
    for feats in batches:                 # feats [B, D], any float dtype
        state = update_stats(state, feats)
    mu, sigma = finalize_stats(state)     # mu [D], sigma [D, D] (unbiased)

(:func:`stream_stats` runs this loop over any iterable of batches.)

Accumulation runs on the host in numpy float64: sums of up to ~1e5 squared activations would lose
digits in float32, and the Fréchet formula subtracts nearly equal traces.
"""
from typing import Iterable, NamedTuple, Tuple

import numpy as np


class FeatureStats(NamedTuple):
    """Streaming sufficient statistics of a feature set.

    count: number of rows seen (python int).
    total: [D] float64, sum_i x_i.
    outer: [D, D] float64, sum_i x_i x_i^T.
    """
    count: int
    total: np.ndarray
    outer: np.ndarray


def init_stats(dim: int) -> FeatureStats:
    """Empty statistics for D = `dim` features."""
    if int(dim) < 1:
        raise ValueError(f'feature dim must be >= 1, got {dim}')
    dim = int(dim)
    return FeatureStats(0, np.zeros((dim, ), np.float64), np.zeros((dim, dim), np.float64))


def update_stats(stats: FeatureStats, features) -> FeatureStats:
    """Adds a batch `features` [B, D] (numpy or jax array) to `stats`; returns new statistics."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != stats.total.shape[0]:
        raise ValueError(f'features must have shape [B, {stats.total.shape[0]}], got {x.shape}')
    if not np.all(np.isfinite(x)):
        raise ValueError('features must be finite (got NaN or inf)')
    return FeatureStats(stats.count + x.shape[0], stats.total + x.sum(axis=0),
                        stats.outer + x.T @ x)


def finalize_stats(stats: FeatureStats) -> Tuple[np.ndarray, np.ndarray]:
    """Mean mu [D] and unbiased covariance sigma [D, D] (float64).

    sigma = (sum_i x_i x_i^T - n mu mu^T) / (n - 1), which equals np.cov(x, rowvar=False).
    """
    n = stats.count
    if n < 2:
        raise ValueError(f'need at least 2 feature rows for a covariance, got {n}')
    mu = stats.total / n
    sigma = (stats.outer - n * np.outer(mu, mu)) / (n - 1)
    # The two products above are each symmetric only up to round-off; make it exact.
    return mu, 0.5 * (sigma + sigma.T)


def stream_stats(batches: Iterable, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 of the rows of ``batches``, feature arrays [B_i, D = dim]
    (numpy or jax) consumed one at a time; at least 2 rows in all."""
    stats = init_stats(dim)
    for feats in batches:
        stats = update_stats(stats, feats)
    return finalize_stats(stats)


def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of one in-memory feature array [N, D]; a one-batch stream."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f'features must have shape [N, D], got {x.shape}')
    return stream_stats([x], x.shape[1])


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'{name}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}')
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f'{name}: mean and covariance must be finite')


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off removed.

    Eigenvalues below D * float64-eps * max|w| (numpy's matrix_rank tolerance) are numerically
    zero. They are set to exactly 0 because sqrt amplifies them: a round-off 1e-16 would
    contribute 1e-8 per zero direction to the trace of the square root.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.max(np.abs(w)))
    return np.where(w > tol, w, 0.0)


def _range_root(sigma: np.ndarray) -> np.ndarray:
    """R [D, r] with R R^T = sigma and orthogonal columns: V_r diag(sqrt(w_r)) over the r
    eigenvalues of the symmetric PSD sigma that are not round-off zeros."""
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    w = _psd_eigvals(w)
    keep = w > 0
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

    Shapes: mu [D], sigma [D, D]; returns a python float >= 0 (up to round-off).

    Numerics (the choice made here): tr((S1 S2)^{1/2}) is the sum of the square roots of the
    eigenvalues of S1 S2. For PSD S1, S2 these equal the eigenvalues of the *symmetric* PSD matrix
    M = S1^{1/2} S2 S1^{1/2} (similar to S1 S2 when S1 is invertible; equal non-zero spectra of
    AB and BA in general). With S1 = V_r diag(w_r) V_r^T over its r non-zero eigenvalues and
    R = V_r diag(sqrt(w_r)), M = V_r (R^T S2 R) V_r^T, so the non-zero eigenvalues of M are those
    of the r x r matrix K = R^T S2 R. We sum sqrt(eigvalsh(K)), zeroing eigenvalues below the
    round-off level (negatives included). One D x D eigendecomposition, and for sample
    covariances of N < D points (rank N - 1) the second one is only N x N.
    Unlike scipy.linalg.sqrtm of the non-symmetric S1 S2, this never produces complex parts or
    NaN and is exact for singular (rank-deficient, e.g. fewer samples than features)
    covariances, so no eps*I ridge is needed in the normal case.

    eps: the ridge eps * I is added to both covariances only as a fallback, if the
    eigendecomposition fails to converge (LinAlgError), matching the pytorch-fid convention.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_gaussian(mu1, sigma1, 'first Gaussian')
    _check_gaussian(mu2, sigma2, 'second Gaussian')
    if mu1.shape != mu2.shape:
        raise ValueError(f'feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}')
    if not eps >= 0:
        raise ValueError(f'eps must be >= 0, got {eps}')

    def trace_sqrt_product(s1, s2):
        root1 = _range_root(s1)
        if root1.shape[1] == 0:  # S1 = 0
            return 0.0
        k = root1.T @ s2 @ root1
        return float(np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh(0.5 * (k + k.T))))))

    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        ridge = eps * np.eye(mu1.shape[0])
        sigma1, sigma2 = sigma1 + ridge, sigma2 + ridge
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
