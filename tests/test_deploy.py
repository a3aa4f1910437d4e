"""The deployed run on Flower's runtime (SuperLink + 4 SuperNodes over loopback) equals the
simulation, and a SuperNode killed mid-round leaves that client dropped while the round completes.

One deployed session of the PTB :tiny config (4 clients, 2 per round) on the tiny corpus serves
both checks: its first 3 rounds are compared with a 3-round simulation (checkpoint step 3 and rows
1-3; sampling and the rounds' results do not depend on fed.rounds), and in its 4th round the
SuperNode of one sampled client is SIGKILLed as soon as the round's messages are out. A second,
shorter FedSA session (3 rounds, reusing the first simulation's cached backbone) checks the
client-side persistent rows: each client's B_k, read back from its node's cache dir, equals the
simulation's row of ``alg.personal``.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.heavy  # Flower deployment: a server and client processes per test

pytest.importorskip('flwr')

from configs import ptb_fedgen_edge  # noqa: E402
from experiments import deploy, train  # noqa: E402
from experiments import translate  # noqa: E402
from fedgen.io import checkpoint  # noqa: E402
from fedgen.deploy.flower import personal, wire  # noqa: E402

CLIENTS = 4


def _config(corpus, rounds=3):
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source = corpus
    c.data.verify_md5 = False
    c.fed.rounds = rounds
    return c


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(x) for x in f]


def _state(workdir, config, step):
    m = checkpoint.manager(workdir, config.checkpoint.keep)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return m.restore(step, args=args)['state']


@pytest.fixture(scope='module')
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp('deploy')
    cfg = _config(corpus)
    sim = str(root / 'sim')
    train.run(cfg, sim)
    dep = str(root / 'dep')
    # The same backbone recipe: the deployed server reads the simulation's cached backbone
    # instead of pre-training it again (its content checksum is verified on load).
    shutil.copytree(os.path.join(sim, 'backbone'), os.path.join(dep, 'backbone'))
    cfg4 = _config(corpus, rounds=4)
    victim = int(translate.spec(cfg4).sample_round(3)[0][0])
    killed = []

    def kill_when_sent(line, fleet):
        if line.startswith('round 4/4: training clients') and not killed:
            fleet.kill_node(victim % CLIENTS)  # SuperNode j holds the ids k with k mod 4 = j
            killed.append(victim)

    out = deploy.deploy(
        cfg4,
        CLIENTS,
        dep,
        round_timeout=120,  # round 1 loads data and compiles in every client
        connect_timeout=120,
        run_timeout=900,
        on_line=kill_when_sent)
    assert killed and out['ok'], '\n'.join(out['lines'][-30:])
    return cfg, sim, dep, victim


@pytest.fixture(scope='module')
def fedsa_runs(corpus, runs, tmp_path_factory):
    root = tmp_path_factory.mktemp('deploy_fedsa')
    cfg = _config(corpus)
    cfg.fed.algorithm = 'fedsa'
    sim, dep = str(root / 'sim'), str(root / 'dep')
    for w in (sim, dep):
        shutil.copytree(os.path.join(runs[1], 'backbone'), os.path.join(w, 'backbone'))
    train.run(cfg, sim)
    out = deploy.deploy(cfg, CLIENTS, dep, round_timeout=120, connect_timeout=120, run_timeout=900)
    assert out['ok'], '\n'.join(out['lines'][-30:])
    return cfg, sim, dep


def test_deployed_personal_rows_equal_simulation(fedsa_runs):
    cfg, sim, dep = fedsa_runs
    a, b = _state(sim, cfg, 3), _state(dep, cfg, 3)
    assert not jax.tree.leaves(b.get('clients', {}))  # the server holds no rows; the nodes do
    for x, y in zip(jax.tree.leaves(a['trainable']), jax.tree.leaves(b['trainable'])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)
    rows = _rows(dep)
    for x, y in zip(_rows(sim), rows):
        assert y['deploy_used_ids'] == y['deploy_client_ids']
        assert y['up_bytes_round'] == x['up_bytes_round'] == y['deploy_payload_up_bytes']
        assert y['train_loss'] == pytest.approx(x['train_loss'], rel=1e-4)
    last = personal.last_used(rows)
    sampled = sorted(
        {i
         for rnd in range(3)
         for i in translate.spec(cfg).sample_round(rnd)[0].tolist()})
    assert sorted(last) == sampled
    # Every client's row as its node holds it (the initial row for the ones never sampled),
    # stacked [N, ...] into the simulation's layout, then both sides' alg.personal.
    r = train.setup(translate.spec(cfg), sim)
    key = personal.run_key(translate.spec(cfg).record, dep)
    held = [
        personal.start_row(dep, key, k, last.get(k, -1), r['state'].clients)
        for k in range(cfg.fed.num_clients)
    ]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *held)
    mine = r['alg'].personal(r['state'].replace(trainable=b['trainable'], clients=stacked))
    ref = r['alg'].personal(r['state'].replace(trainable=a['trainable'], clients=a['clients']))
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(mine)):
        x, y = np.asarray(x)[sampled], np.asarray(y)[sampled]
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)
    moved = jax.tree.leaves(jax.tree.map(lambda x: np.abs(x[sampled]).max(), stacked))
    assert max(moved) > 0  # B_k moved away from its zero init on the sampled clients


def test_deployed_run_equals_simulation(runs):
    cfg, sim, dep, _ = runs
    a, b = _state(sim, cfg, 3), _state(dep, cfg, 3)
    for x, y in zip(jax.tree.leaves(a['trainable']), jax.tree.leaves(b['trainable'])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)
    sim_rows, dep_rows = _rows(sim), _rows(dep)[:3]
    assert len(sim_rows) == len(dep_rows) == 3
    for rnd, (x, y) in enumerate(zip(sim_rows, dep_rows)):
        assert y['deploy_client_ids'] == translate.spec(cfg).sample_round(rnd)[0].tolist()
        assert y['deploy_dropped'] == []
        assert set(x) - {'round_s'} == {k for k in y if not k.startswith('deploy_')} - {'round_s'}
        for k, v in x.items():
            if k == 'round_s':
                continue
            if isinstance(v, float) and not float(v).is_integer():
                assert y[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
            else:
                assert y[k] == v, k  # rounds, client counts, bytes: exact
        # Bytes on the wire: the uploads' arrays are exactly fedgen's count; Flower's messages
        # add headers (record, per-array metadata, .npy headers) on top.
        assert y['deploy_payload_up_bytes'] == y['up_bytes_round']
        assert y['deploy_wire_up_bytes'] > y['up_bytes_round']
    with open(os.path.join(dep, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['deployed'] and summary['rounds'] == 4


def test_killed_supernode_counts_as_dropped(runs):
    cfg, _, dep, victim = runs
    rows = _rows(dep)
    assert [r['round'] for r in rows] == [1, 2, 3, 4]
    last = rows[-1]
    assert victim in last['deploy_client_ids'] and last['deploy_dropped'] == [victim]
    assert last['clients_sampled'] == 2 and last['clients_reported'] == 1
    assert last['clients_used'] == 1
    # The dropped client downloaded but did not upload: one client's uplink, two downlinks.
    assert last['up_bytes_round'] == rows[0]['up_bytes_round'] // 2
    assert last['down_bytes_round'] == rows[0]['down_bytes_round']
    assert np.isfinite(last['valid_ppl'])


def test_core_never_imports_flwr():
    code = ('import sys, fedgen, fedgen.fl.engine, fedgen.algorithms, fedgen.aggregators, '
            'experiments.train; assert "flwr" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_bad_config_fails_before_anything_starts(corpus, tmp_path):
    cfg = _config(corpus)
    with pytest.raises(ValueError, match='--clients'):
        deploy.deploy(cfg, 9, str(tmp_path / 'w'))
    cfg.fed.lora_aggregation = 'ffa'
    with pytest.raises(ValueError, match='not deployable'):
        deploy.deploy(cfg, 4, str(tmp_path / 'w'))
    assert not os.path.exists(tmp_path / 'w')


def test_wire_round_trip_checks_shapes():
    tree = {'lora': {'a': np.ones((3, 2), np.float32), 'b': np.zeros((2, 3), np.float32)}}
    rec = wire.to_record(tree)
    back = wire.from_record(rec, tree)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, tree))
    assert wire.payload_bytes(tree) == 48
    with pytest.raises(ValueError, match='expects'):
        wire.from_record(rec, {'lora': {'a': np.ones((3, 3), np.float32), 'b': tree['lora']['b']}})
