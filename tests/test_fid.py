"""Tests for fedgen.metrics.fid: batched Inception features -> streamed stats -> Fréchet distance.

Random InceptionV3 weights; the network itself is checked against torch in test_inception.py.
"""
import numpy as np
import pytest
from flax import traverse_util

from conftest import random_inception_flat
from fedgen.metrics import fid, frechet, inception


@pytest.fixture(scope='module')
def variables():
    return traverse_util.unflatten_dict(random_inception_flat(), sep='/')


@pytest.fixture(scope='module')
def images():
    """Two sets of 5 uint8 16x16 images: dark noise (a) and bright noise (b)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 128, size=(5, 16, 16, 3)).astype(np.uint8)
    b = rng.integers(128, 256, size=(5, 16, 16, 3)).astype(np.uint8)
    return a, b


@pytest.fixture(scope='module')
def whole(variables, images):
    """Features of each set from ONE unbatched network call (the reference for batching)."""
    return [np.asarray(inception.features(variables, x), np.float64) for x in images]


def test_batched_features_equal_one_call(variables, images, whole):
    # 5 images in batches of 2: the last batch is padded and the padding must be dropped.
    got = fid.inception_features(variables, images[0], batch_size=2)
    assert got.shape == (5, inception.FEATURE_DIM)
    np.testing.assert_allclose(got, whole[0], rtol=1e-5, atol=1e-5)


def test_stats_are_mean_and_unbiased_covariance(variables, images, whole):
    mu, sigma = fid.inception_stats(variables, images[0], batch_size=2)
    np.testing.assert_allclose(mu, whole[0].mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(whole[0], rowvar=False), rtol=1e-4, atol=1e-5)


def test_fid_equals_frechet_distance_of_the_feature_gaussians(variables, images, whole):
    ref = fid.inception_stats(variables, images[0], batch_size=2)
    got = fid.fid(variables, ref, images[1], batch_size=2)
    mu_a, mu_b = whole[0].mean(axis=0), whole[1].mean(axis=0)
    s_a, s_b = np.cov(whole[0], rowvar=False), np.cov(whole[1], rowvar=False)
    want = frechet.frechet_distance(mu_a, s_a, mu_b, s_b)
    assert got == pytest.approx(want, rel=1e-4)
    # Dark vs bright noise is far apart; a set against itself is at distance ~0.
    scale = np.trace(s_a) + np.trace(s_b)
    assert got > 0.1 * scale
    assert abs(fid.fid(variables, ref, images[0], batch_size=2)) < 1e-6 * scale


def test_bad_inputs_raise(variables, images):
    with pytest.raises(ValueError, match='batch_size'):
        fid.inception_features(variables, images[0], batch_size=0)
    with pytest.raises(ValueError, match=r'\[N, H, W, 3\]'):
        fid.inception_features(variables, images[0][..., :1])
    with pytest.raises(ValueError, match='at least 2'):
        fid.inception_stats(variables, images[0][:1])
