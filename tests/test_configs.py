"""Every config's :tiny runs: configs/{ptb,cifar10}_<method>.py for all eight methods, 2 rounds on
tiny data, one pre-trained backbone per task (the first run's, shared via pretrain.backbone_path).

Each run must give finite metrics and exactly the bytes of the trees its method sends (counted
here by hand from the backbone and adapter shapes); Ditto resumes equal to unbroken (its per-client
trees are part of the checkpoint); and the personalization of finished runs reports the same
columns for every method (CIFAR-10 included), with personal trees that load back
(checkpoint.load_personal). The main configs' resume is tested in test_train / test_train_cifar.
"""
import importlib
import json
import math
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import write_image_folder, write_ptb_corpus
from experiments import personalize as personal_exp
from experiments import train, translate
from fedgen.io import checkpoint
from fedgen.lora import adapters as lora

METHODS = ('fedgen_edge', 'fedavg_full', 'fedprox', 'ditto', 'fedsa', 'local_only', 'centralized',
           'fedadam')
TASKS = ('ptb', 'cifar10')


class Runs:
    """Trains each (task, method) tiny config once, in order of first use; the first run of a
    task pre-trains the backbone every later run of that task loads."""

    def __init__(self, root):
        self.root = root
        (root / 'ptb_data').mkdir()
        self.data = {
            'ptb': write_ptb_corpus(root / 'ptb_data'),
            'cifar10': write_image_folder(root / 'cifar_data')
        }
        self.backbone = {}
        self.done = {}

    def config(self, task, method):
        c = importlib.import_module(f'configs.{task}_{method}').get_config('tiny')
        c.data.source = self.data[task]
        if task == 'ptb':
            c.data.verify_md5 = False
        else:
            c.eval.samples_every_eval = False
            c.metrics.cache_dir = str(self.root / 'cifar_cache')  # one fd_classifier
        if task in self.backbone:
            c.pretrain.backbone_path = self.backbone[task]
        return c

    def workdir(self, task, method):
        return str(self.root / f'{task}_{method}')

    def get(self, task, method):
        if (task, method) not in self.done:
            if task not in self.backbone and method != 'fedgen_edge':
                self.get(task, 'fedgen_edge')  # pre-trains the shared backbone
            cfg = self.config(task, method)
            wd = self.workdir(task, method)
            summary = train.run(cfg, wd)
            if task not in self.backbone:
                (name, ) = os.listdir(os.path.join(wd, 'backbone'))
                self.backbone[task] = os.path.join(wd, 'backbone', name)
            self.done[(task, method)] = (cfg, wd, summary)
        return self.done[(task, method)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp('configs'))


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(x).items() if k != 'round_s'} for x in f]


def _state(workdir, config):
    m = checkpoint.manager(workdir, config.checkpoint.keep)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return m.restore(checkpoint.latest(m), args=args)['state']


def expected_bytes(cfg, backbone: dict) -> int:
    """What one client sends per round, by hand: adapters (A and B) for LoRA FedAvg, FedProx,
    Ditto and FedAdam; A only for FedSA; every backbone leaf for full FedAvg; nothing for
    local-only and centralized."""
    name = cfg.fed.algorithm
    if name in ('local_only', 'centralized'):
        return 0
    if name == 'fedavg_full':
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backbone))
    adapters = lora.init(jax.random.PRNGKey(0), backbone, tuple(cfg.lora.targets), cfg.lora.rank)
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    keep = ('a', ) if name == 'fedsa' else ('a', 'b')
    return sum(x.size * x.dtype.itemsize for p, x in flat if p[-1].key in keep)


# A CIFAR-10 run compiles a U-Net round per method (one to two minutes on 2 cores): the CIFAR-10
# cases are the heavy tier's (the main CIFAR-10 config's run and resume: tests/test_train_cifar.py).
CASES = [(t, m) if t == 'ptb' else pytest.param(t, m, marks=pytest.mark.heavy) for t in TASKS
         for m in METHODS]


@pytest.mark.parametrize('task,method', CASES)
def test_tiny_config_runs(runs, task, method):
    cfg, wd, summary = runs.get(task, method)
    expect_name = 'fedgen_edge' if method == 'fedadam' else method
    assert summary['algorithm'] == expect_name and summary['rounds'] == 2
    if method == 'fedadam':
        assert cfg.fed.server_opt != 'sgd'
    metric = 'valid_ppl' if task == 'ptb' else 'fd_classifier'
    assert math.isfinite(summary[f'final_{metric}']) and summary[f'final_{metric}'] > 0
    rows = _rows(wd)
    assert [r['round'] for r in rows] == [1, 2]
    assert all(math.isfinite(r['train_loss']) for r in rows)
    backbone = checkpoint.load_tree(runs.backbone[task], None, 'backbone')
    per = expected_bytes(cfg, backbone)
    c = cfg.fed.clients_per_round
    assert summary['up_bytes_per_client_round'] == summary['down_bytes_per_client_round'] == per
    assert [r['up_bytes_round'] for r in rows] == [c * per] * 2
    assert [r['down_bytes_round'] for r in rows] == [c * per] * 2
    assert summary['up_bytes_total'] == summary['down_bytes_total'] == 2 * c * per


def test_ditto_resumes_equal_to_unbroken(runs, tmp_path):
    cfg, full, _ = runs.get('ptb', 'ditto')
    cfg = runs.config('ptb', 'ditto')
    resumed = str(tmp_path / 'resumed')
    assert train.run(cfg, resumed, stop_after=1) == {'stopped_after': 1}
    train.run(cfg, resumed)
    assert _rows(resumed) == _rows(full)
    a, b = _state(full, cfg), _state(resumed, cfg)
    chex.assert_trees_all_equal(a, b)
    moved = np.abs(np.asarray(jax.tree.leaves(a['clients'])[-1])).max()
    assert moved > 0  # the per-client trees were trained and restored


@pytest.mark.parametrize(
    'task,method', [('ptb', 'fedgen_edge'), ('ptb', 'fedsa')] +
    [pytest.param('cifar10', m, marks=pytest.mark.heavy) for m in ('fedgen_edge', 'local_only')])
def test_personalization_columns_and_saved_trees(runs, task, method):
    cfg, wd, summary = runs.get(task, method)
    spec = translate.spec(cfg)
    run = personal_exp.restore(spec, wd)
    res, rows, s = personal_exp.run_personalize(spec, 1, run)
    personal_exp.write(wd, rows, s)
    kept = method in ('fedsa', 'local_only')
    m = s['metric']
    assert m == ('ppl' if task == 'ptb' else 'denoise_mse')
    assert s['personal_source'] == ('kept' if kept else 'finetuned')
    assert s['finetune_epochs'] == (None if kept else 1)
    assert s['has_global'] == (not kept) and (s['vs_global'] is None) == kept
    assert s['vs_backbone']['clients'] == (s['clients_trained'] if kept else s['clients_tested'])
    # Sampling replayed from the config: 2 rounds x clients_per_round draws.
    assert sum(r['rounds_sampled'] for r in rows) == 2 * cfg.fed.clients_per_round
    for r in rows:
        if r['n_test'] == 0:
            continue
        assert r[f'backbone_{m}'] > 0 and r[f'personal_{m}'] > 0
        np.testing.assert_allclose(r['gain_vs_backbone'],
                                   r[f'backbone_{m}'] - r[f'personal_{m}'],
                                   rtol=1e-6)
        if kept:
            assert r[f'global_{m}'] is None and r['gain_vs_global'] is None
            assert r['trained'] == (r['rounds_sampled'] > 0)
        else:
            assert r[f'global_{m}'] > 0 and r['trained'] == (r['rounds_sampled'] > 0)
    # The backbone column is one reference for every method: equal across methods of a task.
    other = 'fedsa' if method == 'fedgen_edge' and task == 'ptb' else None
    if other:
        o_cfg, o_wd, _ = runs.get(task, other)
        o_spec = translate.spec(o_cfg)
        _, o_rows, _ = personal_exp.run_personalize(o_spec, 1, personal_exp.restore(o_spec, o_wd))
        assert [r[f'backbone_{m}'] for r in o_rows] == [r[f'backbone_{m}'] for r in rows]
    if kept:  # the kept trees are the method's own, untouched
        chex.assert_trees_all_equal(res.personal, run['alg'].personal(run['state']))
    path = checkpoint.save_personal(wd, run['step'], res.personal)
    assert os.path.isdir(path)
    back = checkpoint.load_personal(wd, run['step'], jax.tree.map(np.zeros_like, res.personal))
    chex.assert_trees_all_equal(back, jax.tree.map(np.asarray, res.personal))
    for name in ('personalization.csv', 'personalization.json', 'personalization_gains.png'):
        assert os.path.getsize(os.path.join(wd, name)) > 0
