"""End-to-end smoke of the tiny CIFAR-10 configs on a tiny image folder written here: 2 rounds,
killed after round 1 and resumed (equal to unbroken), sample grids, label histograms, fd_classifier,
and the full-model baseline's uplink."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import cifar10_fedavg_full, cifar10_fedgen_edge
from conftest import random_inception_flat, write_image_folder
from experiments import train
from fedgen.io import checkpoint


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('cifar'))


def _config(folder, module=cifar10_fedgen_edge):
    c = module.get_config('tiny')
    c.data.source = folder
    return c


def _state(workdir, config):
    m = checkpoint.manager(workdir, config.checkpoint.keep)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return m.restore(checkpoint.latest(m), args=args)['state']


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(x).items() if k != 'round_s'} for x in f]


def _with_caches(src, dst):
    os.makedirs(dst)
    for cache in ('backbone', 'classifier'):
        shutil.copytree(os.path.join(src, cache), os.path.join(dst, cache))
    return dst


@pytest.fixture(scope='module')
def unbroken(folder, tmp_path_factory):
    full = str(tmp_path_factory.mktemp('c10') / 'full')
    return full, train.run(_config(folder), full)


def test_tiny_cifar_run_resume_and_outputs(folder, unbroken, tmp_path):
    cfg = _config(folder)
    full, summary = unbroken
    for name in ('samples_round0001.png', 'samples_round0002.png', 'samples_final.png',
                 'label_histograms.png', 'summary.json', 'config.json'):
        assert os.path.isfile(os.path.join(full, name)), name
    grid = np.asarray(Image.open(os.path.join(full, 'samples_final.png')))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    assert np.isfinite(summary['final_fd_classifier']) and summary['final_fd_classifier'] > 0
    # Kill after round 1, resume (reusing the cached backbone and classifier).
    resumed = _with_caches(full, str(tmp_path / 'resumed'))
    assert train.run(cfg, resumed, stop_after=1) == {'stopped_after': 1}
    summary2 = train.run(cfg, resumed)
    assert _rows(resumed) == _rows(full)
    for x, y in zip(jax.tree.leaves(_state(full, cfg)), jax.tree.leaves(_state(resumed, cfg))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert summary2['final_fd_classifier'] == summary['final_fd_classifier']


def test_tiny_cifar_full_model_uplink(folder, unbroken, tmp_path):
    cfg = _config(folder, cifar10_fedavg_full)
    cfg.fed.rounds = 1
    cfg.eval.samples_every_eval = False
    s = train.run(cfg, _with_caches(unbroken[0], str(tmp_path / 'full')))
    assert s['algorithm'] == 'fedavg_full'
    assert s['up_bytes_per_client_round'] * s['lora_share_of_full_uplink'] < \
        s['up_bytes_per_client_round'] / 10


def _random_inception(path):
    """Random InceptionV3 weights, as the .npz of metrics.inception_path."""
    with open(path, 'wb') as f:
        np.savez(f, **random_inception_flat())
    return path


def test_tiny_cifar_fid_with_inception_weights(folder, unbroken, tmp_path):
    cfg = _config(folder)
    cfg.fed.rounds = 1
    cfg.eval.samples_every_eval = False
    cfg.eval.fd_samples = cfg.eval.sample_batch  # one sampler call per evaluation
    cfg.metrics.inception_path = _random_inception(str(tmp_path / 'inception.npz'))
    s = train.run(cfg, _with_caches(unbroken[0], str(tmp_path / 'fid')))
    for key in ('backbone_fid', 'final_fid'):
        assert np.isfinite(s[key]) and s[key] > 0, key
    assert 'fid' in _rows(str(tmp_path / 'fid'))[-1]
    # The same run without weights reports the classifier distance only, never an FID.
    assert 'fid' not in unbroken[1] and 'final_fid' not in unbroken[1]
