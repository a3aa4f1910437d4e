"""The client axis sharded over 4 fake CPU devices gives the 1-device round and traces once.

jax fixes its device count at import, so the check runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax is imported there.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedgen import population

CHILD = r'''
import json, sys
import jax
import numpy as np
import optax
sys.path.insert(0, sys.argv[1])
from conftest import Tiny
from fedgen import client, population
from fedgen.algorithms import fedavg
from fedgen.data import batching

assert jax.device_count() == 4, jax.devices()
t = Tiny()
frozen = {'params': t.params}
mesh = population.client_mesh(4)
out = {'diff': 0.0, 'scale': 0.0}

def compare(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        out['diff'] = max(out['diff'], float(np.abs(np.asarray(x) - np.asarray(y)).max()))
        out['scale'] = max(out['scale'], float(np.abs(np.asarray(y)).max()))

# A sharded FedAvg round (C = 8 incl. n_k = 0 padding, 2 per device, chunk 1 = lax.map on each
# device), jitted once with a trace counter, over 4 rounds with different clients and n_k.
# Round 0 has all 6 clients and is compared with the 1-device round (full vmap, no padding).
ref_alg = t.algorithm(chunk=6)
state = ref_alg.init({'lora': t.adapters}, jax.random.PRNGKey(3))
ref, ref_m = jax.jit(ref_alg.apply)(state, frozen, t.round_data([0, 1, 2, 3, 4, 5]))
alg = fedavg.make(t.loss_fn, optax.adam(1e-2), optax.sgd(1.0), 1, mesh=mesh)
traces = []
def counted(s, f, d):
    traces.append(1)
    return alg.apply(s, f, d)
apply = jax.jit(counted)
s, frz = population.replicate(state, mesh), population.replicate(frozen, mesh)
for rnd, ids in enumerate(([0, 1, 2, 3, 4, 5], [3, 4, 5], [1, 3, 5], [0, 2, 4])):
    d = batching.pad_clients(t.round_data(ids, rnd), 8)  # C = 8 every round
    s, m = apply(s, frz, population.shard_clients(d, mesh))
    if rnd == 0:
        compare(s.trainable, ref.trainable)
        compare(m['train_loss'], ref_m['train_loss'])
out['traces'] = len(traces)
out['rounds'] = int(s.round)

# map_clients really lays the client axis out over the 4 devices.
y = jax.jit(lambda a, x: population.map_clients(lambda s, v: v * s, a, x, 1, mesh=mesh))(
    np.float32(2), np.arange(8, dtype=np.float32))
out['devices'] = len({sh.device for sh in y.addressable_shards})
out['shard_rows'] = [int(sh.data.shape[0]) for sh in y.addressable_shards]
out['y_ok'] = bool(np.array_equal(np.asarray(y), 2 * np.arange(8)))
upd = client.make_local_update(t.loss_fn, optax.adam(1e-2))
try:
    fedavg.run_clients(upd, state, frozen, t.round_data([0, 1, 2, 3, 4, 5]), 1, mesh=mesh)
    out['bad_c'] = 'no error'
except ValueError as e:
    out['bad_c'] = str(e)
print('RESULT' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def child():
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run(
        [sys.executable, '-c', CHILD, os.path.join(root, 'tests')],
        env=env,
        capture_output=True,
        text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT')][-1]
    return json.loads(line[len('RESULT'):])


def test_four_device_round_equals_one_device_round(child):
    assert child['diff'] <= 1e-6, child
    assert child['scale'] > 1e-3  # the adapters moved, so the comparison is not vacuous


def test_client_axis_is_split_over_devices(child):
    assert child['devices'] == 4 and child['shard_rows'] == [2, 2, 2, 2] and child['y_ok']


def test_sharded_round_traces_once(child):
    assert child['traces'] == 1 and child['rounds'] == 4


def test_uneven_client_count_is_rejected(child):
    assert 'fed.clients_per_round' in child['bad_c'] and 'pad_clients' in child['bad_c']


def test_chunk_for_budget():
    assert population.chunk_for_budget(100, 1000, 32) == 10
    assert population.chunk_for_budget(100, 50, 32) == 1  # never below one client
    assert population.chunk_for_budget(100, 10**9, 32) == 32  # never above C
    with pytest.raises(ValueError, match='fed.client_mem_budget_mb'):
        population.chunk_for_budget(100, 0, 32)


def test_client_bytes_grows_with_the_per_client_data():
    fn = lambda s, x: (x['a'] @ s).sum()
    shared = np.ones((64, 64), np.float32)
    small = population.client_bytes(fn, shared, {'a': np.zeros((1, 8, 64), np.float32)})
    large = population.client_bytes(fn, shared, {'a': np.zeros((1, 512, 64), np.float32)})
    assert small > 0 and large >= 512 * 64 * 4 > small


TRAIN_CHILD = r'''
import json, sys
import jax
sys.path.insert(0, sys.argv[1])
from conftest import write_ptb_corpus
import pathlib
from configs import ptb_fedgen_edge
from experiments import train

d = pathlib.Path(sys.argv[2])
write_ptb_corpus(d)
out = {}
for devices in (1, 4):
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source, c.data.verify_md5 = str(d), False
    c.fed.clients_per_round, c.fed.num_devices = 3, devices  # 3 clients padded to 4 devices
    s = train.run(c, str(d / f'run{devices}'))
    out[devices] = s['final_valid_loss']
print(json.dumps(out))
'''


def test_train_entry_point_on_four_devices_equals_one(tmp_path):
    """experiments.train with fed.num_devices=4 (padding + sharded placement) gives the same
    final validation loss as the 1-device run."""
    env = dict(os.environ,
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, '-c', TRAIN_CHILD,
         os.path.join(root, 'tests'),
         str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(got['1'] - got['4']) < 1e-5, got
