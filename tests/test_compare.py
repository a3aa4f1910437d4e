"""A tiny end-to-end compare run: methods train, personalize and land in one table with the same
columns (two methods keep it fast; every method's update is tested in test_algorithms and every
config in test_configs)."""
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
    assert list(rows[0]) == list(rows[1])  # one set of columns for every method
    for r in rows:
        assert math.isfinite(r['clients_personal_ppl']) and r['clients_personal_ppl'] > 1
        assert math.isfinite(r['share_improved_vs_backbone'])
    # The backbone reference is the same model for every method.
    assert by['fedsa']['clients_backbone_ppl'] == by['fedgen_edge']['clients_backbone_ppl']
    assert 0 < by['fedsa']['up_MB_round'] < by['fedgen_edge']['up_MB_round']
    assert 0 < by['fedsa']['down_MB_client_round'] < by['fedgen_edge']['down_MB_client_round']
    g, s = by['fedgen_edge'], by['fedsa']
    assert g['has_global'] and not s['has_global']
    assert g['personal'] == 'finetuned' and g['finetune_epochs'] == 1.0
    assert s['personal'] == 'kept' and math.isnan(s['finetune_epochs'])
    for col in ('global_valid_ppl', 'clients_global_ppl', 'share_improved_vs_global'):
        assert math.isnan(s[col]) and math.isfinite(g[col]), col
    assert g['global_valid_ppl'] < g['backbone_metric']
    with open(os.path.join(wd, 'compare.csv')) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with open(os.path.join(wd, 'compare.md')) as f:
        assert 'n/a' in f.read()
    for name in ('convergence.png', 'compare.md', 'fedgen_edge/personalization.csv',
                 'fedgen_edge/personalization_gains.png', 'fedsa/personalization.json'):
        assert os.path.getsize(os.path.join(wd, name)) > 0
    with pytest.raises(ValueError, match='--methods'):
        compare.run('ptb', wd, methods=['nope'])
