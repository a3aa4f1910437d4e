"""experiments.rescore: a finished run scored again under another eval protocol."""
import json
import os
import shutil

import pytest

from experiments import rescore, train
from experiments import personalize as personal_exp
from helpers_runs import tiny_ptb_config


@pytest.fixture(scope='module')
def done(corpus, tmp_path_factory):
    """A finished 1-round tiny PTB run with a server EMA: (workdir, summary)."""
    c = tiny_ptb_config(corpus, rounds=1)
    c.fed.ema_decay = 0.5
    workdir = str(tmp_path_factory.mktemp('rescore') / 'run')
    return workdir, train.run(c, workdir)


def test_the_run_s_own_protocol_gives_its_summary_back(done):
    workdir, summary = done
    out = rescore.rescore(workdir, {})
    for k in ('valid_ppl', 'test_ppl', 'valid_ppl_ema', 'test_ppl_ema'):
        name, ema = (k[:-4], 'final_ema') if k.endswith('_ema') else (k, 'final')
        assert out[ema][name] == pytest.approx(summary[f'final_{k}'], rel=1e-5)
    assert out['backbone']['valid_ppl'] == pytest.approx(summary['backbone_valid_ppl'], rel=1e-5)
    assert out['final']['valid_ppl'] != pytest.approx(out['backbone']['valid_ppl'], rel=1e-4)
    assert out['round'] == 1


def test_another_protocol_is_scored_and_cached(done, monkeypatch):
    workdir, summary = done
    over = rescore.parse(['window=4', 'stride=2'], {'window': 0, 'stride': 0, 'every': 1})
    assert over == {'window': 4, 'stride': 2}
    first = rescore.rescore(workdir, over, backbone=False)
    assert 'backbone' not in first and set(first['final_ema']) == set(first['final'])
    assert (first['eval']['window'], first['eval']['stride']) == (4, 2)
    assert first['final']['valid_window'] == 4 and first['final']['valid_stride'] == 2
    assert first['final']['valid_ppl'] != pytest.approx(summary['final_valid_ppl'], rel=1e-4)
    out = rescore.rescore(workdir, over)  # adds the backbone, keeps the finals
    assert {k: out[k] for k in first} == first and out['backbone']['valid_window'] == 4
    assert len(os.listdir(os.path.join(workdir, 'rescore'))) == 2

    def refuse(*args, **kwargs):
        raise RuntimeError('a cached protocol restored the run again')

    monkeypatch.setattr(personal_exp, 'restore', refuse)
    assert rescore.rescore(workdir, over) == out
    assert rescore.rescore(workdir, over, backbone=False) == out


def test_bad_requests_are_one_line_errors(done, tmp_path):
    workdir, _ = done
    section = {'window': 0, 'subset_lines': 0, 'samples_every_eval': False}
    with pytest.raises(ValueError, match=r"^--eval must be field=value .*got 'rounds=3'$"):
        rescore.parse(['rounds=3'], section)
    with pytest.raises(ValueError, match=r"^--eval window must be a int, got 'big'$"):
        rescore.parse(['window=big'], section)
    with pytest.raises(ValueError, match=r"^--eval samples_every_eval must be a bool"):
        rescore.parse(['samples_every_eval=yes'], section)
    with pytest.raises(ValueError, match=r'^eval.stride must be in \[1, eval.window=4\], got 8$'):
        rescore.rescore(workdir, {'window': 4, 'stride': 8})
    with pytest.raises(ValueError, match=r'no such field'):
        rescore.rescore(workdir, {'roundz': 1})
    unfinished = str(tmp_path / 'unfinished')
    os.makedirs(unfinished)
    shutil.copy(os.path.join(workdir, 'config.json'), unfinished)
    with pytest.raises(ValueError, match=r'has not finished \(no summary.json\)'):
        rescore.rescore(unfinished, {})
    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    config['fed'].update(algorithm='fedsa', ema_decay=0.0)
    with open(os.path.join(unfinished, 'config.json'), 'w') as f:
        json.dump(config, f)
    shutil.copy(os.path.join(workdir, 'summary.json'), unfinished)
    with pytest.raises(ValueError, match=r"fed.algorithm='fedsa' has no global model"):
        rescore.rescore(unfinished, {})


def test_a_split_subset_is_scored_alone_and_completed_later(done, monkeypatch):
    """splits=('test',) evaluates only the test split; a later call for both splits evaluates
    only the missing validation pairs and keeps the cached test numbers."""
    workdir, _ = done
    over = {'window': 6, 'stride': 3}
    calls = []
    restore = personal_exp.restore

    def counted(*args, **kwargs):
        calls.append(1)
        return restore(*args, **kwargs)

    monkeypatch.setattr(personal_exp, 'restore', counted)
    test_only = rescore.rescore(workdir, over, splits=('test', ))
    for name in ('final', 'final_ema', 'backbone'):
        assert test_only[name]['test_window'] == 6 and 'valid_ppl' not in test_only[name]
    both = rescore.rescore(workdir, over)
    assert len(calls) == 2
    for name in ('final', 'final_ema', 'backbone'):
        assert both[name]['test_ppl'] == test_only[name]['test_ppl']
        assert both[name]['valid_stride'] == 3
    assert rescore.rescore(workdir, over, splits=('valid', )) == both and len(calls) == 2
    for bad in ((), ('train', ), ('test', 'test')):
        with pytest.raises(ValueError, match=r"^--splits must be distinct names among "):
            rescore.rescore(workdir, over, splits=bad)
