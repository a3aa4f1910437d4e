"""experiments.reproduce at smoke scale (report, figures, reuse) and the report's rules."""
import json
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import claims, lm_study, measures, report, reproduce
from fedgen import aggregators
from fedgen.aggregators import weighting as aggregate

pytestmark = pytest.mark.heavy  # the reproduce smoke: several whole runs and a report

CLAIMS = ('1. uplink', '2. PTB perplexity', '3. CIFAR-10 quality', '4. personalization',
          '5. LoRA rank', '6. local epochs')
VERDICTS = (claims.HOLDS, claims.FAILS, claims.UNSURE, claims.UNTESTABLE)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """Two invocations of the smoke scale into one workdir, timed: the first with --tune (the
    personalization-budget grid runs), the second without (it is read back)."""
    wd = str(tmp_path_factory.mktemp('reproduce'))
    t0 = time.time()
    first = reproduce.run('smoke', wd, tune=True)
    t1 = time.time()
    summary = os.path.join(wd, 'ptb', 'fedgen_edge', 'seed0', 'summary.json')
    stamp = os.path.getmtime(summary)
    second = reproduce.run('smoke', wd)
    return dict(wd=wd,
                first=first,
                second=second,
                t_first=t1 - t0,
                t_second=time.time() - t1,
                stamp=stamp,
                summary=summary)


def _table(path):
    with open(path) as f:
        return [ln for ln in f.read().splitlines() if ln.startswith('| ')]


def test_smoke_report_has_every_claim_and_figure(smoke):
    out = os.path.join(smoke['wd'], 'report')
    rows = _table(os.path.join(out, 'REPORT.md'))
    for claim in CLAIMS:
        row = next(r for r in rows if r.startswith(f'| {claim}'))
        assert any(f'| {v} |' in row for v in VERDICTS), row
    assert len(smoke['first']['figures']) == 7
    for name in smoke['first']['figures'].values():
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
    m = smoke['first']
    assert 0 < m['uplink']['reduction_blocks'] < m['uplink']['reduction_whole'] < 1
    assert m['uplink']['param_bytes']['embedding'] > 0
    assert all(m['epochs'][e]['drift'] > 0 for e in m['epochs'])  # measured, not missing
    assert m['ptb']['fedgen_edge']['std'] is not None and len(
        m['ptb']['fedgen_edge']['per_seed']) == 2
    assert os.path.exists(os.path.join(smoke['wd'], 'results.json'))
    for k in ('personal', 'personal_window'):  # claim 4 on both local test splits, every seed
        assert len(m[k]['per_seed']) == 2 and m[k]['clients'] > 0, k
    for split, group in (('document', 'fedgen_edge_document'), ('window', 'fedgen_edge')):
        with open(os.path.join(smoke['wd'], 'ptb', group, 'seed0', 'config.json')) as f:
            assert json.load(f)['data']['partition']['local_test_unit'] == split


def test_smoke_main_study_is_the_llama_one_scored_on_the_whole_splits(smoke):
    """The main study (configs/ptb_smollm2_<method>.py:tiny): full FedAvg's lr picked from its
    grid, the main comparison's final models and the zero-shot backbone scored again under the
    scale's protocol (window 8, stride 8), the second study (the small GPT) beside it."""
    m = smoke['first']
    assert m['setup']['config'] == 'ptb_smollm2' and m['setup']['model']['name'] == 'llama'
    grid = {float(k): v for k, v in m['lr_grid'].items()}
    assert set(grid) == {1e-3, 1e-2} and m['full_lr'] == min(grid, key=grid.get)
    edge = {float(k): v for k, v in m['edge_lr_grid'].items()}  # FedGen-Edge tuned alike
    assert set(edge) == {1e-3, 1e-2} and m['edge_lr'] == min(edge, key=edge.get)
    w = m['whole']
    assert (w['protocol']['window'], w['protocol']['stride']) == (8, 8)
    for k in ('fedgen_edge', 'fedavg_full'):
        assert len(w[k]['valid']['per_seed']) == 2 and w[k]['test']['mean'] > 1
    assert 'centralized' not in w and w['backbone']['test'] > 1  # claim 2's runs only
    # another protocol than the per-round one: the whole-split number is a new measurement
    assert w['fedgen_edge']['valid']['per_seed'][0] != m['ptb']['fedgen_edge']['per_seed'][0]
    small = m['small_gpt']
    assert small['setup']['config'] == 'ptb' and small['setup']['model']['name'] == 'gpt'
    assert len(small['personal']['per_seed']) == 2 and not small['rank']
    with open(os.path.join(smoke['wd'], 'report', 'REPORT.md')) as f:
        text = f.read()
    assert '### Second study: GPT' in text and 'frozen backbone (zero-shot)' in text


def test_smoke_fashion_mnist_study_backbone_claim_3_and_own_class_shares(smoke):
    """The image study on the smoke IDX files: the backbone's page and grid in the report,
    both methods over two seeds, and one own-class share per FedGen-Edge seed; CIFAR-10 runs at
    this scale, so claim 3 stays CIFAR-10's."""
    f = smoke['first']['fmnist']
    out = os.path.join(smoke['wd'], 'report')
    b = f['backbone']
    assert b['fd_gen'] > 0 and b['fd_floor'] > 0 and b['ratio'] == b['fd_gen'] / b['fd_floor']
    assert b['steps'] == 20 and b['n'] == 10
    for k in ('fedgen_edge', 'fedavg_full'):
        assert len(f['fd'][k]['per_seed']) == 2 and f['fd'][k]['n'] == 2, k
    assert 0 < f['up_bytes']['fedgen_edge'] < f['up_bytes']['fedavg_full']
    assert len(f['class_share']) == 2
    for s in f['class_share']:
        assert s['clients'] == 2 and 0 <= s['mean_share_personal'] <= 1
        assert 0 <= s['loss_improved'] <= 1 and s['samples_per_model'] == 4
    assert f['personalize']['max_steps'] == 0 and f['personalize']['epochs'] == 1
    assert len(f['grid']) == 2  # per seed: lr 1e-3 and 1e-2 at one step, the same two clients
    for g, s in zip(f['grid'], f['class_share']):
        assert [(x['lr'], x['max_steps']) for x in g] == [(1e-3, 1), (1e-2, 1)]
        assert {x['mean_share_reference'] for x in g} == {s['mean_share_reference']}
        assert all(x['clients'] == 2 and 0 <= x['conf_personal'] <= 1 for x in g)
    for name in ('fmnist_backbone.md', 'fmnist_backbone_samples.png', 'fmnist_class_share.png',
                 'fmnist_personal_grid.png'):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    with open(os.path.join(out, 'REPORT.md')) as fh:
        text = fh.read()
    assert '## Fashion-MNIST: a pre-trained image generator, personalized' in text
    assert '![own-class share](fmnist_class_share.png)' in text
    assert "Each client's personal model: the global adapter fine-tuned on its own images" in text
    assert '![personalization budget](fmnist_personal_grid.png)' in text
    assert '| 0.01 | 1 | 1 |' in text  # the grid table: lr, steps, seed
    assert any(c[0] == '3. CIFAR-10 quality' for c in smoke['first']['claims'])
    # where CIFAR-10 is not run (the cpu scale), claim 3 is read from Fashion-MNIST's FDs
    row = report.claims(dict(smoke['first'], cifar10={'skipped': 'not run'}))[2]
    assert row[0] == '3. image quality (Fashion-MNIST)' and row[3] in VERDICTS
    assert row[2].startswith('FD (classifier features), not FID: ')


def test_second_invocation_reuses_the_finished_runs(smoke):
    assert os.path.getmtime(smoke['summary']) == smoke['stamp']  # not rerun
    assert smoke['t_second'] < 0.5 * smoke['t_first']
    a, b = smoke['first'], smoke['second']
    assert a['claims'] == b['claims']
    assert a['ptb'] == b['ptb'] and a['rank'] == b['rank'] and a['personal'] == b['personal']
    assert a['fmnist'] == b['fmnist']  # the backbone's quality and the shares read back


def test_bootstrap_share_on_hand_examples():
    assert claims.bootstrap_share([True] * 10) == (1.0, 1.0, 1.0)
    share, lo, hi = claims.bootstrap_share([True, False] * 50, seed=3)
    assert share == 0.5 and 0.35 < lo < 0.5 < hi < 0.65
    assert claims.bootstrap_share([True, False] * 50, seed=3) == (share, lo, hi)  # seeded
    _, lo2, hi2 = claims.bootstrap_share([True, False] * 5, seed=3)
    assert hi2 - lo2 > hi - lo  # fewer clients, wider interval
    assert np.isnan(claims.bootstrap_share([])[0])


def test_drift_hook_is_the_weighted_mean_plus_drift():
    u = {'a': jnp.array([[2.0, 0.0], [0.0, 0.0], [100.0, 100.0]])}
    w = jnp.array([1.0, 1.0, 0.0])  # the third client did not report
    agg = aggregators.weighted_mean(drift=True)
    mean, state, m = agg.aggregate(u, w, 'state', None, None)
    np.testing.assert_allclose(mean['a'], aggregate.weighted_mean(u, w)['a'])
    np.testing.assert_allclose(mean['a'], [1.0, 0.0])
    assert state == 'state'
    np.testing.assert_allclose(m['client_drift'], 1.0, rtol=1e-6)  # (1 + 1) / 2 / ||[1, 0]||
    assert 'client_drift' not in aggregators.weighted_mean().aggregate(u, w, (), None, None)[2]


def test_reproduce_turns_the_drift_hook_on_in_a_copy():
    from configs import ptb_fedgen_edge
    c = ptb_fedgen_edge.get_config('tiny')
    on = lm_study.measured(c)
    assert on.fed.log_client_drift and not c.fed.log_client_drift


def test_param_bytes_splits_embeddings():
    tree = {
        'wte': {
            'embedding': np.zeros((10, 4), np.float32)
        },
        'h_0': {
            'attn': {
                'q': {
                    'kernel': np.zeros((4, 4), np.float32)
                }
            }
        },
        'wpe': {
            'embedding': np.zeros((2, 4), np.float16)
        }
    }
    assert measures.param_bytes(tree) == {'whole': 160 + 64 + 16, 'embedding': 176, 'blocks': 64}
