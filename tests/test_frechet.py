"""Tests for fedgen.metrics.frechet: closed form vs scipy, streaming stats, edge cases."""
import numpy as np
import pytest
import scipy.linalg

from fedgen.metrics import frechet

DIM = 16


def _random_spd(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or dim))
    return a @ a.T / dim + (0.0 if rank else 0.1 * np.eye(dim))


def _scipy_reference(mu1, s1, mu2, s2):
    """Independent closed form with scipy's general (non-symmetric) matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_matches_scipy_sqrtm_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
        s1, s2 = _random_spd(rng, DIM), _random_spd(rng, DIM)
        got = frechet.frechet_distance(mu1, s1, mu2, s2)
        want = _scipy_reference(mu1, s1, mu2, s2)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert got > 0.1


def test_diagonal_case_by_hand():
    # For commuting diagonal covariances d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 0.0])
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(5.0 + 1.0 + 1.0 + 0.0, rel=1e-12)


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=DIM), _random_spd(rng, DIM)
    assert abs(frechet.frechet_distance(mu, s, mu, s)) < 1e-9


def test_symmetric_in_arguments():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
    s1, s2 = _random_spd(rng, DIM), _random_spd(rng, DIM, rank=5)
    d12 = frechet.frechet_distance(mu1, s1, mu2, s2)
    d21 = frechet.frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(d21, rel=1e-10)


def test_singular_covariances_are_finite_and_correct():
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, DIM, rank=3), _random_spd(rng, DIM, rank=4)
    mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
    got = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    # Reference on well-conditioned neighbours: d^2 is continuous in the covariances.
    ridge = 1e-10 * np.eye(DIM)
    want = _scipy_reference(mu1, s1 + ridge, mu2, s2 + ridge)
    assert got == pytest.approx(want, abs=1e-4)
    # Same singular covariance on both sides, and the all-zero covariance (one repeated point).
    assert abs(frechet.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    zero = np.zeros((DIM, DIM))
    assert frechet.frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum((mu1 - mu2)**2),
                                                                           rel=1e-12)


def test_singular_commuting_covariances_by_hand():
    # Shared random eigenbasis Q, spectra with zeros: d^2 = sum (sqrt(a) - sqrt(b))^2 exactly.
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    a = np.concatenate([rng.uniform(0.5, 2.0, size=6), np.zeros(DIM - 6)])
    b = np.concatenate([rng.uniform(0.5, 2.0, size=3), np.zeros(DIM - 3)])
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu = np.zeros(DIM)
    want = float(np.sum((np.sqrt(a) - np.sqrt(b))**2))
    assert frechet.frechet_distance(mu, s1, mu, s2) == pytest.approx(want, rel=1e-9)


def test_streaming_stats_equal_numpy_over_all_data():
    rng = np.random.default_rng(4)
    data = rng.normal(loc=3.0, scale=2.0, size=(103, DIM)).astype(np.float32)
    state = frechet.init_stats(DIM)
    for start in range(0, len(data), 25):  # uneven last batch
        state = frechet.update_stats(state, data[start:start + 25])
    mu, sigma = frechet.finalize_stats(state)
    assert state.count == 103
    np.testing.assert_allclose(mu, np.mean(data.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma,
                               np.cov(data.astype(np.float64), rowvar=False),
                               rtol=1e-10,
                               atol=1e-12)
    mu_one, sigma_one = frechet.gaussian_stats(data)
    np.testing.assert_allclose(mu_one, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_one, sigma, rtol=1e-10, atol=1e-12)
    mu_s, sigma_s = frechet.stream_stats((data[s:s + 25] for s in range(0, len(data), 25)), DIM)
    np.testing.assert_array_equal(mu_s, mu)  # the same loop: bit-identical
    np.testing.assert_array_equal(sigma_s, sigma)


def test_sample_stats_distance_shrinks_with_same_source():
    rng = np.random.default_rng(5)
    a = frechet.gaussian_stats(rng.normal(size=(4000, 4)))
    b = frechet.gaussian_stats(rng.normal(size=(4000, 4)))
    c = frechet.gaussian_stats(rng.normal(loc=1.0, size=(4000, 4)))
    assert frechet.frechet_distance(*a, *b) < 0.05
    assert frechet.frechet_distance(*a, *c) == pytest.approx(4.0, rel=0.1)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        frechet.update_stats(frechet.init_stats(3), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        frechet.finalize_stats(frechet.update_stats(frechet.init_stats(3), np.zeros((1, 3))))
    with pytest.raises(ValueError):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet.frechet_distance(np.zeros(3), np.eye(3) * np.nan, np.zeros(3), np.eye(3))


def test_sample_covariances_with_fewer_points_than_dims_by_nuclear_norm():
    # S_i = X_i^T X_i / (n_i - 1) with centred X_i [n_i, D], n_i << D: the non-zero eigenvalues
    # of S1 S2 are the squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so
    # tr((S1 S2)^{1/2}) is that matrix's nuclear norm (an independent, exact reference).
    rng = np.random.default_rng(7)
    x1, x2 = rng.normal(size=(12, 300)), rng.normal(loc=0.3, size=(9, 300)) * 2.0
    (mu1, s1), (mu2, s2) = frechet.gaussian_stats(x1), frechet.gaussian_stats(x2)
    c1, c2 = x1 - x1.mean(axis=0), x2 - x2.mean(axis=0)
    nuclear = np.linalg.svd(c1 @ c2.T / np.sqrt(11 * 8), compute_uv=False).sum()
    want = np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-10)
