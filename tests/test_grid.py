"""The measured-comparison grids: their rows, configs, table and figures (no training here)."""
import json

import pytest

from experiments import grid, writers


def test_rows_cover_every_issue_cell():
    robust = grid.rows('robust')
    assert len(robust) == 3 * len(grid.AGGREGATORS)
    assert {o.get('fed.attack.fraction', 0.0) for _, _, o in robust} == {0.0, 0.1, 0.3}
    lora = grid.rows('lora')
    assert len(lora) == 18
    assert {o['data.partition.alpha'] for _, _, o in lora} == {0.1, 1.0}
    names = [n for n, _, _ in grid.rows('privacy')]
    assert names == ['eps_inf', 'clip_only', 'eps_8', 'eps_2']
    with pytest.raises(ValueError, match='--grid'):
        grid.rows('nope')


def test_config_for_applies_scale_then_row_overrides():
    c = grid.config_for('cpu', {'fed.aggregator': 'median', 'fed.rounds': 3}, '')
    assert c.fed.aggregator == 'median'
    assert c.fed.rounds == 3  # the row wins over the scale
    assert c.fed.clients_per_round == grid.SCALE['cpu']['fed.clients_per_round']


def _row(name, group, ppl, round_s, err=None):
    return {
        'row': name,
        'group': group,
        'final_valid_ppl': ppl,
        'backbone_valid_ppl': 320.0,
        'round_s_median': round_s,
        'up_MB_per_round': 1.0,
        'down_MB_per_round': 2.0,
        'lora_agg_error_mean': None if err is None else sum(e for _, e in err) / len(err),
        'lora_agg_error_curve': err or [],
        'dp_epsilon': None,
        'clients_used_mean': 20.0
    }


def test_markdown_times_are_relative_to_the_group_reference():
    table = [
        _row('a0.1_avg_ab', 'a0.1', 300.0, 2.0, [(1, 0.1), (2, 0.3)]),
        _row('a0.1_stack', 'a0.1', 310.0, 5.0, [(1, 0.0), (2, 0.0)]),
        _row('a1.0_avg_ab', 'a1.0', 290.0, 4.0, [(1, 0.2)]),
    ]
    text = grid.markdown('lora', 'cpu', table, 60.0)
    body = [line for line in text.splitlines() if line.startswith('| a')]
    assert [line.split(' | ')[3] for line in body] == ['1', '2.5', '1']
    assert '![aggregation error per round](lora_error.png)' in text


def test_figures_write_pngs(tmp_path):
    table = [
        _row('a0.1_avg_ab', 'a0.1', 300.0, 2.0, [(1, 0.1), (2, 0.3)]),
        _row('a1.0_avg_ab', 'a1.0', 290.0, 4.0, [(1, 0.2)]),
        _row('a1.0_ffa', 'a1.0', None, 4.0, [(1, 0.0)]),  # a diverged row has no bar
    ]
    paths = grid.figures('lora', table, str(tmp_path))
    assert [p.rsplit('/', 1)[1] for p in paths] == ['lora.png', 'lora_error.png']
    for p in paths:
        with open(p, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_finished_reuses_only_an_identical_finished_run(tmp_path):
    """A grid row reuses a finished run only when its whole config is identical
    (writers.finished, the same check train.run makes), but for the personalize.* fields that
    training never reads (writers.POST_RUN)."""
    config = grid.config_for('tiny', {'fed.aggregator': 'median'}, '')
    assert writers.finished(config.to_json_best_effort(), str(tmp_path)) is None  # nothing there
    (tmp_path / 'config.json').write_text(config.to_json_best_effort())
    assert writers.finished(config.to_json_best_effort(),
                            str(tmp_path)) is None  # not finished: no summary
    (tmp_path / 'summary.json').write_text('{"final_valid_ppl": 123.0}')
    assert writers.finished(config.to_json_best_effort(), str(tmp_path)) == {
        'final_valid_ppl': 123.0
    }
    other = grid.config_for('tiny', {'fed.aggregator': 'mean'}, '')
    assert writers.finished(other.to_json_best_effort(), str(tmp_path)) is None
    rounds = grid.config_for('tiny', {'fed.aggregator': 'median', 'fed.rounds': 7}, '')
    assert writers.finished(rounds.to_json_best_effort(),
                            str(tmp_path)) is None  # more rounds: train.run resumes it
    later = grid.config_for('tiny', {
        'fed.aggregator': 'median',
        'personalize.lr': 0.5,
        'personalize.max_steps': 3
    }, '')
    assert later.personalize.lr != config.personalize.lr
    assert writers.finished(later.to_json_best_effort(), str(tmp_path)) == {
        'final_valid_ppl': 123.0
    }
    # a field added after the run was recorded: its old behaviour's value matches, others do not
    recorded = json.loads(config.to_json_best_effort())
    del recorded['model']['ce_vocab_chunk']
    (tmp_path / 'config.json').write_text(json.dumps(recorded))
    assert config.model.ce_vocab_chunk == writers.ADDED_FIELDS['model.ce_vocab_chunk'] == 0
    assert writers.finished(config.to_json_best_effort(), str(tmp_path)) is not None
    vocab = grid.config_for('tiny', {'fed.aggregator': 'median', 'model.ce_vocab_chunk': 64}, '')
    assert writers.finished(vocab.to_json_best_effort(), str(tmp_path)) is None
