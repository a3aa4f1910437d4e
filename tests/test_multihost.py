"""A real multi-process run: 2 processes x 2 CPU devices on localhost (jax.distributed, gloo CPU
collectives) run ``python -m experiments.train --distributed`` and end in exactly the state,
rows and summary of the 1-process run, with process 0 the only one that writes files.

Who writes is observed with a Python audit hook (a sitecustomize.py on the children's path) that
records every file opened for writing, renamed, created or removed under the workdir. Orbax's
array data goes through TensorStore (C++, unseen by the hook); the test checks its per-process
ocdbt directories instead.
"""
import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import train
from helpers_runs import latest_state, metrics_rows, tiny_ptb_config

pytestmark = pytest.mark.heavy  # several JAX processes per test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = r'''
import atexit, json, os, sys
_log, _root = os.environ.get('FEDGEN_AUDIT_LOG'), os.environ.get('FEDGEN_AUDIT_ROOT')
if _log and _root:
    _root, _seen, _on = os.path.realpath(_root), [], [True]

    def _inside(p):
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(_root)
        except (TypeError, ValueError):
            return False

    def _hook(event, args):
        if not _on[0] or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == 'open':
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        else:
            writes = event in ('os.rename', 'os.remove', 'os.mkdir', 'os.rmdir', 'shutil.rmtree',
                               'os.truncate', 'os.symlink', 'os.link')
        if writes and _inside(args[0]):
            _seen.append([event, os.fsdecode(args[0])])

    def _dump():
        _on[0] = False
        with open(_log, 'w') as f:
            json.dump(_seen, f)

    sys.addaudithook(_hook)
    atexit.register(_dump)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp('multihost')
    one = str(root / 'one')
    summary = train.run(tiny_ptb_config(corpus), one)  # the 1-process, 1-device reference
    (backbone, ) = glob.glob(os.path.join(one, 'backbone', '*'))
    site = root / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(AUDIT)
    two = str(root / 'two')
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(os.environ,
                   XLA_FLAGS='--xla_force_host_platform_device_count=2',
                   JAX_PLATFORMS='cpu',
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
                   PYTHONPATH=os.pathsep.join([str(site), ROOT,
                                               os.environ.get('PYTHONPATH', '')]),
                   FEDGEN_AUDIT_LOG=str(root / f'audit{pid}.json'),
                   FEDGEN_AUDIT_ROOT=two)
        # Same command on every process; the backbone comes from the reference run's cache.
        args = [
            sys.executable, '-m', 'experiments.train', '--distributed',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}',
            '--config', f'{ROOT}/configs/ptb_fedgen_edge.py:tiny', '--workdir', two,
            f'--config.data.source={corpus}', '--config.data.verify_md5=False',
            f'--config.pretrain.backbone_path={backbone}'
        ]
        logs.append(open(root / f'p{pid}.log', 'w+'))
        procs.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=540) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    assert codes == [0, 0], '\n'.join(o[-3000:] for o in outs)
    audits = [json.load(open(root / f'audit{pid}.json')) for pid in range(2)]
    return dict(one=one, two=two, summary=summary, audits=audits, outs=outs)


def test_each_process_packs_its_half_of_the_client_axis(runs):
    zero, one = runs['outs']
    assert '4 rows over 4 device(s) in 2 process(es); this process packs rows 0..1' in zero
    assert '4 rows over 4 device(s) in 2 process(es); this process packs rows 2..3' in one
    assert all('final_valid_ppl' in o for o in runs['outs'])  # both ran to the end


def test_final_state_equals_the_one_process_run(runs):
    """Same program, clients split over 4 devices in 2 processes: the server's weighted mean is a
    cross-process psum that adds the clients in another order than one device does, so leaves
    agree to float32 rounding (the bound test_sharding uses for 4 devices in one process)."""
    (s1, a), (s2, b) = latest_state(runs['one']), latest_state(runs['two'])
    assert s1 == s2 == 2
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    moved = 0.0
    for x, y in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
            moved = max(moved, float(np.abs(x).max()))
        else:  # round counter, rng key
            np.testing.assert_array_equal(y, x)
    assert moved > 1e-3  # the adapters moved, so the comparison is not vacuous


def test_rows_and_summary_equal_the_one_process_run(runs):
    one, two = metrics_rows(runs['one']), metrics_rows(runs['two'])
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for r1, r2 in zip(one, two):
        for k, v in r1.items():
            if isinstance(v, float):
                assert r2[k] == pytest.approx(v, rel=1e-6), k
            else:  # round, byte counts
                assert r2[k] == v, k
    with open(os.path.join(runs['two'], 'summary.json')) as f:
        two = json.load(f)
    for k in ('up_bytes_total', 'down_bytes_total', 'local_steps'):
        assert two[k] == runs['summary'][k], k
    for k in ('final_valid_ppl', 'final_test_ppl'):
        assert two[k] == pytest.approx(runs['summary'][k], rel=1e-6), k


def test_only_process_zero_writes_files(runs):
    zero, one = runs['audits']
    assert one == []
    written = {os.path.basename(p) for _, p in zero}
    assert {'metrics.jsonl.tmp', 'config.json.tmp', 'summary.json.tmp'} <= written
    assert len(glob.glob(os.path.join(runs['two'], 'events.out.tfevents.*'))) == 1
    assert glob.glob(os.path.join(runs['two'], 'checkpoints', '*', 'state', 'ocdbt.process_0'))
    assert not glob.glob(os.path.join(runs['two'], 'checkpoints', '**', '*process_1*'),
                         recursive=True)
