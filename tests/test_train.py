"""End-to-end smoke of the tiny PTB configs on a tiny synthetic corpus: a full run, a run killed
after round 1 and resumed (identical results), full-model FedAvg, and config errors."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import ptb_fedavg_full, ptb_fedgen_edge
from experiments import train
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
