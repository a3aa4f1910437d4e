"""End-to-end smoke of the tiny PTB configs on a tiny synthetic corpus: a full run, a run killed
after round 1 and resumed (identical results), full-model FedAvg, config errors, the rerun of a
finished run (nothing touched), no empty workdir left by a failed start, and the trainer's metric
hooks."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import ptb_fedavg_full, ptb_fedgen_edge
from experiments import runspec, train, trainer, translate
from fedgen.io import checkpoint


def _config(corpus, module=ptb_fedgen_edge):
    c = module.get_config('tiny')
    c.data.source = corpus
    c.data.verify_md5 = False
    return c


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(x).items() if k != 'round_s'} for x in f]


def _final_state(workdir, config):
    m = checkpoint.manager(workdir, config.checkpoint.keep)
    step = checkpoint.latest(m)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return step, m.restore(step, args=args)['state']


def _recording_jit(monkeypatch) -> list:
    """Patches train's jax.jit to record every jitted round program (the function 'apply')."""
    rounds, jit = [], jax.jit

    def record(fun, *args, **kwargs):
        out = jit(fun, *args, **kwargs)
        if getattr(fun, '__name__', '') == 'apply':
            rounds.append(out)
        return out

    monkeypatch.setattr(train.jax, 'jit', record)
    return rounds


def test_run_then_kill_and_resume_equals_unbroken(corpus, tmp_path, monkeypatch):
    cfg = _config(corpus)
    cfg.fed.rounds = 3
    full = str(tmp_path / 'full')
    rounds = _recording_jit(monkeypatch)
    summary = train.run(cfg, full)
    assert summary['rounds'] == 3 and np.isfinite(summary['final_valid_ppl'])
    assert summary['final_valid_ppl'] < summary['backbone_valid_ppl']
    resumed = str(tmp_path / 'resumed')
    assert train.run(cfg, resumed, stop_after=1) == {'stopped_after': 1}
    assert len(_rows(resumed)) == 1
    summary2 = train.run(cfg, resumed)
    # One compiled round per run, also when the state starts from a restored checkpoint.
    assert len(rounds) == 3 and [r._cache_size() for r in rounds] == [1, 1, 1]
    assert _rows(resumed) == _rows(full)
    (s1, a), (s2, b) = _final_state(full, cfg), _final_state(resumed, cfg)
    assert s1 == s2 == 3
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert summary2['final_valid_ppl'] == summary['final_valid_ppl']


def test_full_model_fedavg_uplink_is_full_size(corpus, tmp_path):
    lora_sum = train.run(_config(corpus), str(tmp_path / 'lora'))
    full_sum = train.run(_config(corpus, ptb_fedavg_full), str(tmp_path / 'full'))
    assert full_sum['up_bytes_per_client_round'] > 10 * lora_sum['up_bytes_per_client_round']
    ratio = lora_sum['up_bytes_per_client_round'] / full_sum['up_bytes_per_client_round']
    assert ratio == pytest.approx(lora_sum['lora_share_of_full_uplink'])


def test_memory_budget_picks_the_chunk(corpus, tmp_path):
    small, large = _config(corpus), _config(corpus)
    small.fed.client_mem_budget_mb = 1e-6  # below one client: one client at a time
    large.fed.client_mem_budget_mb = 1e4  # room for every sampled client: a full vmap
    small.fed.rounds = large.fed.rounds = 1
    assert train.run(small, str(tmp_path / 's'))['client_chunk'] == 1
    s = train.run(large, str(tmp_path / 'l'))
    assert s['client_chunk'] == large.fed.clients_per_round


@pytest.mark.parametrize('field,value,match', [
    ('lora.rank', 0, 'lora.rank'),
    ('lora.rank', 999, 'lora.rank'),
    ('fed.clients_per_round', 9, 'fed.clients_per_round'),
    ('data.partition.alpha', 0.0, 'data.partition.alpha'),
    ('lora.targets', ('nothing_matches_this', ), 'lora.targets'),
    ('data.source', '/nonexistent/ptb', 'data.source'),
    ('fed.algorithm', 'fedsomething', 'fed.algorithm'),
    ('checkpoint.keep', 0, r'^checkpoint\.keep must be an int >= 1, got 0$'),
    ('eval.batch_size', 0, r'^eval\.batch_size must be an int >= 1'),
    ('pretrain.steps', -1, r'^pretrain\.steps must be an int >= 0'),
    ('personalize.epochs', -1, r'^personalize\.epochs must be an int >= 0'),
    ('fed.client_chunk', 0, r'^fed\.client_chunk must be an int >= 1'),
])
def test_bad_config_fails_before_compute(corpus, tmp_path, field, value, match):
    cfg = _config(corpus)
    section, name = field.rsplit('.', 1)
    node = cfg
    for part in section.split('.'):
        node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=match):
        train.run(cfg, str(tmp_path / 'bad'))
    assert not os.path.exists(tmp_path / 'bad' / 'backbone')  # nothing was pre-trained


def test_flora_stack_downlink_counts_the_rounds_stacked_factors(corpus, tmp_path):
    """FLoRA by hand: a client uploads its rank-r (A, B), u bytes; it downloads the global adapter
    (u) plus the C clients' stacked factors folded last round (C r slices of u / r bytes), so
    a round costs C u up and C (1 + C) u down, with C = 2 of N = 4 clients."""
    cfg = _config(corpus)
    cfg.fed.lora_aggregation = 'stack'
    summary = train.run(cfg, str(tmp_path / 'stack'))
    u, c = summary['up_bytes_per_client_round'], cfg.fed.clients_per_round
    rows = _rows(str(tmp_path / 'stack'))
    assert [r['up_bytes_round'] for r in rows] == [c * u] * cfg.fed.rounds
    assert [r['down_bytes_round'] for r in rows] == [c * (1 + c) * u] * cfg.fed.rounds
    assert np.isfinite(summary['final_valid_ppl'])


def _files(workdir):
    out = {}
    for root, _, names in os.walk(workdir):
        for n in names:
            p = os.path.join(root, n)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, workdir)] = (os.stat(p).st_mtime_ns, f.read())
    return out


def test_rerun_of_a_finished_run_returns_its_summary_and_changes_nothing(
        corpus, tmp_path, monkeypatch):
    """Same config, all rounds done, summary.json present: no data read, no evaluation, no file
    touched (summary.json's wall_s, metrics.jsonl, no second event file); any other config runs."""
    cfg = _config(corpus)
    cfg.fed.rounds = 1
    workdir = str(tmp_path / 'done')
    summary = train.run(cfg, workdir)
    before = _files(workdir)

    def refuse(*args, **kwargs):
        raise RuntimeError('a finished run read its data again')

    monkeypatch.setattr(runspec.RunSpec, 'prepare_task', refuse)
    assert train.run(cfg, workdir) == summary
    assert _files(workdir) == before
    assert len([f for f in before if 'tfevents' in f]) == 1
    cfg.fed.rounds = 2  # another config (fed.rounds may grow): it is not finished, it resumes
    with pytest.raises(RuntimeError, match='read its data again'):
        train.run(cfg, workdir)


def test_a_run_failing_before_writing_leaves_no_directory_it_made(corpus, tmp_path):
    cfg = _config(corpus)
    cfg.lora.rank = 0
    with pytest.raises(ValueError, match='lora.rank'):
        train.run(cfg, str(tmp_path / 'made' / 'by' / 'run'))
    assert not os.path.exists(tmp_path / 'made')
    (tmp_path / 'mine').mkdir()  # a directory the run did not make stays, even empty
    with pytest.raises(ValueError, match='lora.rank'):
        train.run(cfg, str(tmp_path / 'mine' / 'run'))
    assert os.listdir(tmp_path / 'mine') == []


def test_metric_hooks_add_their_keys_to_every_row(corpus, tmp_path):
    """trainer.train calls each hook with the run's host state and row after every round; the
    returned keys are in metrics.jsonl and TensorBoard (here: the adapters' squared norm)."""
    cfg = _config(corpus)
    cfg.fed.rounds = 2
    workdir = str(tmp_path / 'hooked')
    seen = []

    def norm(spec, t, state, row):
        seen.append((t, row['round']))
        return {
            'adapter_sq_norm':
            float(sum(np.sum(np.square(x)) for x in jax.tree.leaves(state.trainable)))
        }

    spec = translate.spec(cfg)
    member = trainer.Member(spec, train.setup(spec, workdir), workdir, workdir)
    (summary, ), times = trainer.train([member], hooks=[norm])
    assert seen == [(1, 1), (2, 2)] and len(times) == 2
    rows = _rows(workdir)
    (_, state) = _final_state(workdir, cfg)
    want = sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(state['trainable']))
    assert rows[-1]['adapter_sq_norm'] == pytest.approx(float(want), rel=1e-6)
    assert rows[0]['adapter_sq_norm'] != rows[1]['adapter_sq_norm'] > 0
    assert summary['rounds'] == 2


def test_the_config_is_translated_once_and_the_spec_is_frozen(corpus, tmp_path, monkeypatch):
    """train.run and experiments.personalize translate the ConfigDict exactly once (one
    translate.spec call each) and hand the frozen RunSpec down; a RunSpec given to train.run is
    used as is (no translation at all)."""
    from experiments import personalize as personal_exp
    calls = []
    real = translate.spec
    monkeypatch.setattr(translate, 'spec', lambda c: calls.append(1) or real(c))
    cfg = _config(corpus)
    cfg.fed.rounds = 1
    workdir = str(tmp_path / 'once')
    train.run(cfg, workdir)
    assert len(calls) == 1
    personal_exp.main_run(None, workdir, 1, 0)  # reads <workdir>/config.json
    assert len(calls) == 2
    spec = real(cfg)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        spec.seed = 1
    assert train.run(spec, workdir) == train.run(cfg, workdir) and len(calls) == 3
    assert json.loads(spec.record) == json.loads(cfg.to_json_best_effort())
    assert spec.method.name == cfg.fed.algorithm and spec.clients.capacity == 2
