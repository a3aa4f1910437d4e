"""The client axis sharded over 4 fake CPU devices gives the 1-device rounds (every method)
and traces once.

jax fixes its device count at import, so the check runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax is imported there.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedgen import algorithms
from fedgen.fl import mesh as population

pytestmark = pytest.mark.heavy  # a child process on 4 devices runs every method

CHILD = r'''
import dataclasses, json, sys
import jax
import numpy as np
import optax
sys.path.insert(0, sys.argv[1])
from conftest import Tiny
from fedgen import algorithms
from fedgen.fl import local_update as client
from fedgen.fl import engine
from fedgen.fl import mesh as population
from fedgen.data import batching

assert jax.device_count() == 4, jax.devices()
t = Tiny()
mesh = population.client_mesh(4)
out = {'methods': {}}

def compare(a, b, res, moved_by):
    """res['err']: the worst |x - y| / (atol + rtol |y|) (<= 1: allclose at rtol 1e-5 and atol
    max(1e-6, 1e-4 moved_by), where moved_by is how far training moved the tree: float32
    reassociation across the chunked vmap and the device split perturbs entries near zero by a
    tiny share of the update, whatever the random backbone; a wrong client or a lost round moves
    them by a whole update)."""
    atol = max(1e-6, 1e-4 * moved_by)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        res['err'] = max(res['err'], float((np.abs(x - y) / (atol + 1e-5 * np.abs(y))).max()))

def moved(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

EXTRA = {'fedprox': dict(prox_mu=0.5), 'ditto': dict(ditto_lambda=0.5)}
ROUNDS = ([0, 1, 2, 3, 4, 5], [1, 3, 5])
# Every method: two rounds on 1 device (full vmap over the unpadded clients) against two sharded
# rounds (C = 8 incl. n_k = 0 padding, 2 clients per device, chunk 1 = lax.map on each device).
# SGD clients at a small rate: Adam's g / sqrt(g^2) blows float noise in near-zero gradients up
# to lr, and a large SGD rate is chaotic on this tiny model (noise grows step after step).
# Centralized pools the round's examples with a shuffle of length C*S*B, so its reference gets the
# same padded rounds on one device.
for name in algorithms.METHODS:
    p = algorithms.MethodParams(name=name, num_clients=6, client_tx=optax.sgd(0.05),
                                server_tx=optax.sgd(1.0),
                                lora=algorithms.LoraSpec(2, 16.0, ('attn', )),
                                **EXTRA.get(name, {}))
    frozen, trainable = algorithms.variables(p, t.params, jax.random.PRNGKey(1))
    ref_alg = algorithms.make(dataclasses.replace(p, chunk=6), t.loss_fn)
    alg = algorithms.make(dataclasses.replace(p, chunk=1), t.loss_fn, mesh)
    state0 = ref_alg.init(trainable, jax.random.PRNGKey(3))
    ref, s = state0, population.replicate(state0, mesh)
    frz = population.replicate(frozen, mesh)
    ref_apply, apply = jax.jit(ref_alg.apply), jax.jit(alg.apply)
    res = {'err': 0.0, 'loss_diff': 0.0}
    for rnd, ids in enumerate(ROUNDS):
        d = t.round_data(ids, rnd)
        padded = batching.pad_clients(d, 8)
        ref, ref_m = ref_apply(ref, frozen, padded if name == 'centralized' else d)
        s, m = apply(s, frz, population.shard_clients(padded, mesh))
        res['loss_diff'] = max(res['loss_diff'],
                               abs(float(m['train_loss']) - float(ref_m['train_loss'])))
    res['moved'] = moved(ref.trainable, state0.trainable)
    res['clients_moved'] = moved(ref.clients, state0.clients) if ref.clients else 0.0
    compare(s.trainable, ref.trainable, res, res['moved'])
    compare(s.clients, ref.clients, res, res['clients_moved'])
    res['rounds'] = int(s.round)
    out['methods'][name] = res

# FedGen-Edge sharded, jitted once with a trace counter, over 4 rounds with different clients.
alg = algorithms.make(
    algorithms.MethodParams(name='fedgen_edge', num_clients=6, client_tx=optax.adam(1e-2),
                            server_tx=optax.sgd(1.0),
                            lora=algorithms.LoraSpec(2, 16.0, ('attn', ))), t.loss_fn, mesh)
traces = []
def counted(s, f, d):
    traces.append(1)
    return alg.apply(s, f, d)
apply = jax.jit(counted)
frozen = {'params': t.params}
state = alg.init({'lora': t.adapters}, jax.random.PRNGKey(3))
s, frz = population.replicate(state, mesh), population.replicate(frozen, mesh)
for rnd, ids in enumerate(([0, 1, 2, 3, 4, 5], [3, 4, 5], [1, 3, 5], [0, 2, 4])):
    d = batching.pad_clients(t.round_data(ids, rnd), 8)  # C = 8 every round
    s, m = apply(s, frz, population.shard_clients(d, mesh))
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
    engine.run_clients(upd, state, frozen, t.round_data([0, 1, 2, 3, 4, 5]), 1, mesh=mesh)
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
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT')][-1]
    return json.loads(line[len('RESULT'):])


@pytest.mark.parametrize('name', algorithms.METHODS)
def test_four_device_rounds_equal_one_device_rounds(child, name):
    """Every method: global and per-client trees and the train loss after two sharded rounds
    equal the 1-device rounds."""
    res = child['methods'][name]
    assert res['rounds'] == 2
    assert res['err'] <= 1.0 and res['loss_diff'] <= 1e-6, res
    # the comparison is not vacuous: what the method trains has moved
    if name == 'local_only':
        assert res['moved'] == 0.0 and res['clients_moved'] > 1e-3, res
    else:
        assert res['moved'] > 1e-3, res
    if name in ('ditto', 'fedsa'):
        assert res['clients_moved'] > 1e-3, res


def test_client_axis_is_split_over_devices(child):
    assert child['devices'] == 4 and child['shard_rows'] == [2, 2, 2, 2] and child['y_ok']


def test_sharded_round_traces_once(child):
    assert child['traces'] == 1 and child['rounds'] == 4


def test_uneven_client_count_is_rejected(child):
    # engine.run_clients called directly: the library names its own parameters (no section)
    assert child['bad_c'].startswith('clients_per_round (C=6) must be a multiple of '
                                     'num_devices=4') and 'pad_clients' in child['bad_c']


def test_chunk_for_budget():
    assert population.chunk_for_budget(100, 1000, 32) == 10
    assert population.chunk_for_budget(100, 50, 32) == 1  # never below one client
    assert population.chunk_for_budget(100, 10**9, 32) == 32  # never above C
    with pytest.raises(ValueError, match=r'^client_mem_budget_mb'):
        population.chunk_for_budget(100, 0, 32)
    with pytest.raises(ValueError, match=r'^fed\.client_mem_budget_mb'):
        population.chunk_for_budget(100, 0, 32, section='fed.')


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
