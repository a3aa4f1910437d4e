"""experiments.writers: strict-JSON rows, TensorBoard events read back with TensorBoard's own
reader, the purge of a killed session's events on resume, process-0-only writing, and the config
comparison that guards a workdir."""
import glob
import json
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments import writers


def _strict(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f'bare {c} in JSON'))


def _events(workdir):
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    return acc


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [_strict(x) for x in f]


def test_json_safe_nulls_and_flags_nonfinite():
    row = {'round': 3, 'a': 1.5, 'b': float('nan'), 'c': np.float32(np.inf), 'ids': [4, 7]}
    safe = writers.json_safe(row)
    assert safe == {
        'round': 3,
        'a': 1.5,
        'b': None,
        'c': None,
        'ids': [4, 7],
        'nonfinite': ['b', 'c']
    }
    json.dumps(safe, allow_nan=False)  # strict JSON
    assert 'nonfinite' not in writers.json_safe({'round': 1, 'a': 2.0})


def test_scalars_text_and_images_read_back_equal_the_rows(tmp_path):
    w = writers.RunWriter(str(tmp_path), 0, primary=True)
    w.config('{"seed": 0}')
    given = [{
        'round': 1,
        'train_loss': 3.25,
        'up_bytes_total': 3584
    }, {
        'round': 2,
        'train_loss': float('nan'),
        'up_bytes_total': 7168,
        'valid_ppl': 41.5
    }]
    for r in given:
        w.row(r)
    img = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    w.images(img, 2, 'samples_round0002')
    w.texts(['a b', 'c'], 2)
    w.close()
    rows = _rows(str(tmp_path))
    assert rows[1]['train_loss'] is None and rows[1]['nonfinite'] == ['train_loss']
    acc = _events(str(tmp_path))
    tags = acc.Tags()
    assert set(tags['scalars']) == {'train_loss', 'up_bytes_total', 'valid_ppl'}
    for tag in tags['scalars']:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        want = {r['round']: r[tag] for r in rows if tag in r}
        assert got.keys() == want.keys()
        for step, v in want.items():
            if v is None:
                assert math.isnan(got[step])
            else:
                assert got[step] == np.float32(v)
    (image, ) = acc.Images('samples')
    assert image.step == 2 and image.width > 0 and image.height > 0
    assert os.path.exists(tmp_path / 'samples_round0002.png')
    text = acc.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
    assert '"seed": 0' in text
    assert 'a b' in acc.Tensors('samples/text_summary')[0].tensor_proto.string_val[0].decode()
    assert json.load(open(tmp_path / 'config.json')) == {'seed': 0}


def test_resume_keeps_rows_upto_the_step_and_purges_later_events(tmp_path):
    killed = writers.RunWriter(str(tmp_path), 0, primary=True)
    for t in (1, 2, 3):  # rows 2 and 3 were written, but only step 1 committed
        killed.row({'round': t, 'train_loss': 10.0 + t})
    killed.close()
    resumed = writers.RunWriter(str(tmp_path), 1, primary=True)
    assert [r['round'] for r in resumed.rows] == [1]
    assert [r['round'] for r in _rows(str(tmp_path))] == [1]  # rewritten before any round
    for t in (2, 3):
        resumed.row({'round': t, 'train_loss': 20.0 + t})
    resumed.close()
    assert [r['train_loss'] for r in _rows(str(tmp_path))] == [11.0, 22.0, 23.0]
    got = [(e.step, e.value) for e in _events(str(tmp_path)).Scalars('train_loss')]
    assert got == [(1, 11.0), (2, 22.0), (3, 23.0)]  # the killed session's 2 and 3 are purged
    assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 2


def test_non_primary_writes_nothing_but_keeps_rows(tmp_path):
    w = writers.RunWriter(str(tmp_path), 0, primary=False)
    w.config('{}')
    safe = w.row({'round': 1, 'x': float('inf')})
    assert w.images(np.zeros((1, 2, 2, 3), np.uint8), 1, 'samples_final') is None
    w.texts(['t'], 1)
    assert w.summary({
        'rounds': 1,
        'f': float('nan')
    }) == {
        'rounds': 1,
        'f': None,
        'nonfinite': ['f']
    }
    w.close()
    assert safe == {'round': 1, 'x': None, 'nonfinite': ['x']} and w.rows == [safe]
    assert os.listdir(tmp_path) == []


def test_summary_is_strict_json(tmp_path):
    w = writers.RunWriter(str(tmp_path), 0, primary=True)
    w.summary({'rounds': 2, 'final_valid_ppl': float('inf'), 'up_bytes_total': 7})
    w.close()
    got = _strict(open(tmp_path / 'summary.json').read())
    assert got == {
        'rounds': 2,
        'final_valid_ppl': None,
        'up_bytes_total': 7,
        'nonfinite': ['final_valid_ppl']
    }


def test_config_conflict_shows_fields_that_change_results_only():
    old = {
        'task': 'ptb',
        'lora': {
            'rank': 2,
            'targets': ['qv']
        },
        'fed': {
            'rounds': 2,
            'algorithm': 'fedprox'
        },
        'eval': {
            'every': 1
        },
        'data': {
            'source': '/a',
            'seq_len': 8
        }
    }
    new = {
        'task': 'ptb',
        'lora': {
            'rank': 4,
            'targets': ['qv']
        },
        'fed': {
            'rounds': 9,
            'algorithm': 'fedprox'
        },
        'eval': {
            'every': 5
        },
        'data': {
            'source': '/b',
            'seq_len': 8
        },
        'extra': 1
    }
    assert writers.config_conflict(old, new) == ["extra: '<missing>' -> 1", 'lora.rank: 2 -> 4']
    assert writers.config_conflict(old, old) == []


def test_clear_run_removes_outputs_and_keeps_caches(tmp_path):
    for d in ('checkpoints/3', 'backbone/abc', 'personal/3'):
        os.makedirs(tmp_path / d)
    for f in ('config.json', 'metrics.jsonl', 'summary.json', 'events.out.tfevents.1.h',
              'samples_final.png', 'notes.txt'):
        (tmp_path / f).write_text('x')
    gone = writers.clear_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['backbone', 'notes.txt']
    assert 'checkpoints' in gone and 'metrics.jsonl' in gone
