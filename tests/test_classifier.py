"""Tests for fedgen.metrics.classifier on tiny synthetic colour images."""
import jax
import numpy as np
import pytest

from fedgen.metrics import classifier

ARCH = dict(feature_dim=32, widths=(8, 16, 16, 16))
TRAIN = dict(num_classes=2, steps=40, batch_size=16, lr=3e-3)


def _two_colours(n, seed):
    """Class 0 reddish, class 1 bluish, with strong per-pixel noise: uint8 [n, 16, 16, 3]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    base = np.where(labels[:, None], [[60, 80, 190]], [[190, 80, 60]])  # [n, 3]
    noise = rng.normal(scale=40.0, size=(n, 16, 16, 3))
    images = np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope='module')
def trained():
    images, labels = _two_colours(64, seed=0)
    return classifier.train(images, labels, seed=0, **TRAIN, **ARCH)


def test_learns_separable_data_deterministically(trained):
    test_images, test_labels = _two_colours(100, seed=1)
    assert classifier.accuracy(trained, test_images, test_labels) >= 0.95
    logits = classifier.logits(trained, test_images)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    assert -np.mean(log_probs[np.arange(100), test_labels]) < 0.2  # far below log(2) = 0.69
    # Same seed -> bit-identical params; another seed -> different params.
    images, labels = _two_colours(64, seed=0)
    again = classifier.train(images, labels, seed=0, **TRAIN, **ARCH)
    other = classifier.train(images, labels, seed=1, **TRAIN, **ARCH)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), trained, again)
    diff = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), trained, other)
    assert all(jax.tree_util.tree_leaves(same))
    assert not any(jax.tree_util.tree_leaves(diff))


def test_shapes_batching_and_input_conventions(trained):
    images, _ = _two_colours(23, seed=2)
    feats = classifier.features(trained, images)
    assert feats.shape == (23, ARCH['feature_dim'])
    assert classifier.logits(trained, images).shape == (23, 2)
    # A padded last batch gives the same rows as one big batch.
    np.testing.assert_allclose(classifier.features(trained, images, batch_size=7),
                               feats,
                               rtol=1e-5,
                               atol=1e-6)
    as_float = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(classifier.features(trained, as_float), feats, rtol=1e-5, atol=1e-6)


def test_fd_zero_on_itself_and_grows_with_perturbation(trained):
    images, _ = _two_colours(200, seed=3)
    real_stats = classifier.feature_stats(trained, images, batch_size=64)
    scale = float(np.trace(real_stats[1]))
    assert scale > 0
    assert abs(classifier.fd_classifier(trained, real_stats, images, batch_size=64)) < 1e-6 * scale
    rng = np.random.default_rng(4)
    as_float = images.astype(np.float32) / 127.5 - 1.0
    noise = rng.normal(size=as_float.shape).astype(np.float32)
    fds = [
        classifier.fd_classifier(trained, real_stats, np.clip(as_float + s * noise, -1, 1), 64)
        for s in (0.0, 0.2, 0.6)
    ]
    assert fds[0] < 1e-6 * scale
    assert fds[0] < fds[1] < fds[2]


def test_bad_inputs_raise():
    images, labels = _two_colours(8, seed=5)
    with pytest.raises(ValueError, match='num_classes'):
        classifier.train(images, labels + 1, seed=0, **TRAIN, **ARCH)
    with pytest.raises(ValueError, match=r'^steps and batch_size must be >= 1, got 0, 4$'):
        classifier.train(images, labels, 2, 0, 4, 1e-3, 0)
    with pytest.raises(ValueError,
                       match=r'^metrics\.classifier\.steps and metrics\.classifier\.'
                       r'batch_size must be >= 1, got 0, 4$'):
        classifier.train(images, labels, 2, 0, 4, 1e-3, 0, section='metrics.classifier.')
    with pytest.raises(ValueError, match=r'^lr must be > 0, got 0\.0$'):
        classifier.train(images, labels, 2, 5, 4, 0.0, 0)
    with pytest.raises(ValueError, match='shape'):
        classifier.train(images[0], labels, 2, 5, 4, 1e-3, 0)
