"""experiments.fmnist_backbone's scoring: disjoint real sets and the FD / floor / ratio."""
import os

import jax
import numpy as np
import pytest

from experiments import fmnist_backbone
from fedgen.metrics import classifier


def _images(n, seed):
    """uint8 [n, 32, 32, 3]: random bars on a dark background (class-free test images)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (n, 32, 32, 3)).astype(np.uint8)
    for i in range(n):
        c = rng.integers(2, 24)
        x[i, 4:28, c:c + 6] = 200
    return x


def test_real_sets_are_disjoint_and_sized():
    test = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    a, b = fmnist_backbone.real_sets(test, 4, seed=0)
    assert a.shape == b.shape == (4, 2, 2, 3)
    assert not set(a[:, 0, 0, 0]) & set(b[:, 0, 0, 0])
    with pytest.raises(ValueError, match='--samples must be in \\[1, 5\\]'):
        fmnist_backbone.real_sets(test, 6, seed=0)


def test_quality_floor_and_ratio():
    clf = classifier.init(jax.random.PRNGKey(0), 10, feature_dim=8, widths=(8, 8, 8, 8))
    a, b = _images(64, 1), _images(64, 2)
    same = fmnist_backbone.quality(clf, b, a, b)  # samples that are the floor's own set B
    assert same['fd_gen'] == pytest.approx(same['fd_floor'], rel=1e-6)
    assert same['ratio'] == pytest.approx(1.0, rel=1e-6)
    assert same['fd_floor'] > 0  # two finite real sets are never at distance 0
    gray = np.full_like(a, 128)
    gray[:, :16] = 90  # nearly constant samples: far from the real sets
    bad = fmnist_backbone.quality(clf, gray, a, b)
    assert bad['ratio'] > 2 and bad['fd_floor'] == pytest.approx(same['fd_floor'])
    assert abs(sum(bad['class_hist']) - 1) < 1e-2 and 0 <= bad['class_tv'] <= 1


def test_markdown_states_fd_floor_ratio_and_the_cache():
    config = fmnist_backbone.config_for(10, 4, 1e-3)
    assert (config.pretrain.steps, config.pretrain.batch_size) == (10, 4)
    r = dict(fd_gen=12.5,
             fd_floor=2.5,
             ratio=5.0,
             conf_gen=0.6,
             conf_real=0.8,
             class_tv=0.3,
             class_hist=[0.1] * 10,
             classes=[f'c{i}' for i in range(10)],
             source='wd/backbone/h',
             pretrain_s=None,
             pretrain_loss=None,
             classifier_s=1.0,
             sample_s=2.0,
             classifier_test_acc=0.9,
             public_images=6000,
             n=500,
             sample_steps=20,
             steps=10,
             batch_size=4,
             lr=1e-3,
             load=(1.0, 2.0, 3.0),
             command='cmd')
    md = fmnist_backbone.markdown(config, r, 'grid.png')
    assert '| ratio FD / floor | 5 |' in md and '| 12.5 |' in md and '| 2.5 |' in md
    assert 'read back from the cache' in md and 'n/a (cached)' in md and '`wd/backbone/h`' in md
    assert 'not FID' in md and '![samples](grid.png)' in md
    md = fmnist_backbone.markdown(config, {
        **r, 'pretrain_s': 61.0,
        'pretrain_loss': 0.03456
    }, 'grid.png')
    assert 'pre-trained here in 61 s' in md and '0.0346' in md
    md = fmnist_backbone.markdown(config, {**r, 'source': os.path.abspath('wd/backbone/h')}, 'g')
    assert '`wd/backbone/h`' in md and os.getcwd() not in md  # no machine-specific path
