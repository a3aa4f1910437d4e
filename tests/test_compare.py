"""A tiny end-to-end compare run: methods train, personalize and land in one table (two methods
keep it fast; every method's update is tested in test_baselines)."""
import csv
import math
import os

import pytest

from experiments import compare


def test_tiny_compare_runs_and_writes_the_table(corpus, tmp_path):
    wd = str(tmp_path / 'cmp')
    rows = compare.run('ptb',
                       wd,
                       methods=['fedgen_edge', 'fedsa'],
                       arg='tiny',
                       overrides={
                           'data.source': corpus,
                           'data.verify_md5': False
                       })
    by = {r['key']: r for r in rows}
    assert list(by) == ['fedgen_edge', 'fedsa']
    for r in rows:
        assert math.isfinite(r['clients_personal_ppl']) and r['clients_personal_ppl'] > 1
    assert 0 < by['fedsa']['up_MB_round'] < by['fedgen_edge']['up_MB_round']
    assert math.isnan(by['fedsa']['global_valid_ppl'])
    assert by['fedgen_edge']['global_valid_ppl'] < by['fedgen_edge']['backbone_metric']
    with open(os.path.join(wd, 'compare.csv')) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for name in ('convergence.png', 'compare.md', 'fedgen_edge/personalization.csv',
                 'fedgen_edge/personalization_gains.png'):
        assert os.path.getsize(os.path.join(wd, name)) > 0
    with pytest.raises(ValueError, match='--methods'):
        compare.run('ptb', wd, methods=['nope'])
