"""experiments.train's round loop on the tiny PTB config: TensorBoard scalars equal metrics.jsonl;
rows and checkpoints stay consistent under a SIGKILL right after a row is written; a non-finite
global state or a round without clients stops unsaved; a workdir of another config is refused."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments import train
from helpers_runs import latest_state, metrics_rows, tiny_ptb_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(corpus, backbone=''):
    return tiny_ptb_config(corpus, backbone, rounds=3)


def _assert_same_state(a, b):
    (s1, x), (s2, y) = latest_state(a), latest_state(b)
    assert s1 == s2
    la, lb = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(la) == len(lb) > 0
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope='module')
def base(corpus, tmp_path_factory):
    """An unbroken 3-round run; later runs reuse its backbone (no pre-training)."""
    workdir = str(tmp_path_factory.mktemp('base'))
    summary = train.run(_config(corpus), workdir)
    (backbone, ) = glob.glob(os.path.join(workdir, 'backbone', '*'))
    return dict(workdir=workdir, summary=summary, backbone=backbone)


def test_events_hold_config_and_every_row_scalar(base):
    rows = metrics_rows(base['workdir'], keep_time=True)
    assert [r['round'] for r in rows] == [1, 2, 3]
    acc = event_accumulator.EventAccumulator(base['workdir'], size_guidance={'scalars': 0})
    acc.Reload()
    keys = {k for r in rows for k, v in r.items() if k != 'round' and isinstance(v, (int, float))}
    assert 'valid_ppl' in keys and 'up_bytes_total' in keys
    assert set(acc.Tags()['scalars']) == keys
    for k in keys:
        got = {e.step: e.value for e in acc.Scalars(k)}
        assert got == {r['round']: np.float32(r[k]) for r in rows if k in r}, k
    config = acc.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
    assert '"algorithm": "fedgen_edge"' in config
    assert acc.Tensors('samples/text_summary')  # the final text samples


def test_sigkill_after_a_row_resumes_into_the_unbroken_rows(base, corpus, tmp_path):
    """The process is SIGKILLed as soon as round 1's row is on disk, i.e. before or during the
    (asynchronous) save of step 1; the resumed run has the unbroken run's rows, byte totals and
    final state."""
    workdir = str(tmp_path / 'killed')
    args = [
        sys.executable, '-m', 'experiments.train', '--config',
        f'{ROOT}/configs/ptb_fedgen_edge.py:tiny', '--workdir', workdir,
        f'--config.data.source={corpus}', '--config.data.verify_md5=False', '--config.fed.rounds=3',
        f'--config.pretrain.backbone_path={base["backbone"]}'
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(metrics_rows(workdir)) == 1
    summary = train.run(_config(corpus, base['backbone']), workdir)
    assert metrics_rows(workdir) == metrics_rows(base['workdir'])
    _assert_same_state(workdir, base['workdir'])
    for k in ('up_bytes_total', 'down_bytes_total', 'final_valid_ppl', 'final_test_ppl'):
        assert summary[k] == base['summary'][k], k


def test_uncommitted_checkpoint_drops_its_row_and_recomputes_it(base, corpus, tmp_path):
    """A kill after round 2's row but before step 2 committed leaves rows 1-2 and step 1 only:
    the resume drops row 2 and recomputes it (byte totals are not double counted)."""
    workdir = str(tmp_path / 'w')
    cfg = _config(corpus, base['backbone'])
    assert train.run(cfg, workdir, stop_after=2) == {'stopped_after': 2}
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '2'))  # as if its save never committed
    assert [r['round'] for r in metrics_rows(workdir)] == [1, 2]
    summary = train.run(cfg, workdir)
    assert metrics_rows(workdir) == metrics_rows(base['workdir'])
    assert summary['up_bytes_total'] == base['summary'][
        'up_bytes_total'] == 3 * summary['up_bytes_per_round']
    _assert_same_state(workdir, base['workdir'])


def test_nonfinite_global_state_stops_without_saving(base, corpus, tmp_path):
    cfg = _config(corpus, base['backbone'])
    cfg.fed.server_lr = 1e39  # inf in float32: the first server step makes the adapters inf/NaN
    workdir = str(tmp_path / 'nan')
    with pytest.raises(ValueError, match=r'round 1: the global state holds NaN or inf.*round 0'):
        train.run(cfg, workdir)
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == []
    assert metrics_rows(workdir) == []


def test_round_without_clients_is_a_row_and_a_non_finite_state_stops():
    metrics = {
        'train_loss': np.float32(0.0),
        'clients_used': np.float32(0.0),
        'nonfinite_ids': np.array([4, -1])
    }
    state = {'w': np.ones(2, np.float32)}
    row = train.round_row(5, metrics, 4, state)  # K_t = 0 is a valid round (model kept)
    assert row == {'round': 5, 'train_loss': 0.0, 'clients_used': 0.0, 'nonfinite_ids': [4]}
    with pytest.raises(ValueError, match=r'^round 5: the global state holds NaN.*round 4$'):
        train.round_row(5, {'clients_used': np.float32(1.0)}, 4, {'w': np.full(2, np.nan)})


def test_workdir_of_another_config_is_refused_unless_overwrite(base, corpus, tmp_path):
    workdir = str(tmp_path / 'other')
    shutil.copytree(base['workdir'], workdir)
    before = metrics_rows(workdir)
    cfg = _config(corpus)
    cfg.lora.rank = 4
    with pytest.raises(ValueError, match=r'holds a run of another config \(lora.rank: 2 -> 4\)'):
        train.run(cfg, workdir)
    assert metrics_rows(workdir) == before
    cfg.checkpoint.overwrite = True
    assert train.run(cfg, workdir, stop_after=0) == {'stopped_after': 0}
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == [] and metrics_rows(workdir) == []
    assert json.load(open(os.path.join(workdir, 'config.json')))['lora']['rank'] == 4
    assert glob.glob(os.path.join(workdir, 'backbone', '*'))  # the cache is kept
    extended = _config(corpus)
    extended.lora.rank, extended.fed.rounds = 4, 4  # fed.rounds may change between sessions
    assert train.run(extended, workdir, stop_after=0) == {'stopped_after': 0}
