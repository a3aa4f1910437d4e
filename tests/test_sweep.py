"""experiments.sweep: a 3-seed vmapped sweep of the tiny PTB config equals three separate
experiments.train runs with the same seeds and backbone, and so does a group whose runs differ in
learning rates, mu, partition alpha and fate rates; shape-changing groups are refused; a killed
group resumes into the unbroken runs and a finished one is read back."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import ptb_fedgen_edge
from experiments import sweep, train, translate
from fedgen.fl import runs as fsweep
from helpers_runs import latest_state, metrics_rows, tiny_ptb_config

SEEDS = (0, 1, 2)


def _config(corpus, backbone=''):
    return tiny_ptb_config(corpus, backbone, rounds=2)


@pytest.fixture(scope='module')
def backbone(corpus, tmp_path_factory):
    """The tiny backbone, pre-trained once (seed 0), shared by every run below."""
    workdir = str(tmp_path_factory.mktemp('bb'))
    r = train.setup(translate.spec(_config(corpus)), workdir)
    return os.path.abspath(r['bb_info']['source'])


def test_vmapped_seeds_equal_separate_runs(corpus, backbone, tmp_path):
    records = sweep.run_sweep(_config(corpus, backbone), list(SEEDS), str(tmp_path / 'sweep'))
    (g, ) = records
    assert g['seeds'] == list(SEEDS) and not g['failed']
    for seed, run_dir in zip(SEEDS, g['dirs']):
        c = _config(corpus, backbone)
        c.seed = seed
        alone = str(tmp_path / f'alone{seed}')
        summary = train.run(c, alone)
        with open(os.path.join(run_dir, 'summary.json')) as f:
            got = json.load(f)
        np.testing.assert_allclose(got['final_valid_ppl'], summary['final_valid_ppl'], rtol=1e-5)
        np.testing.assert_allclose(got['final_test_ppl'], summary['final_test_ppl'], rtol=1e-5)
        assert got['backbone_valid_ppl'] == summary['backbone_valid_ppl']
        a, b = metrics_rows(run_dir), metrics_rows(alone)
        assert [r['round'] for r in a] == [r['round'] for r in b] == [1, 2]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x['train_loss'], y['train_loss'], rtol=1e-5)
            np.testing.assert_allclose(x['valid_ppl'], y['valid_ppl'], rtol=1e-5)
            for k in ('clients_used', 'up_bytes_total', 'down_bytes_total'):
                assert x[k] == y[k]
        (s1, x), (s2, y) = latest_state(run_dir), latest_state(alone)
        assert s1 == s2 == 2
        lx, ly = jax.tree.leaves(x['trainable']), jax.tree.leaves(y['trainable'])
        assert len(lx) == len(ly) > 0
        # Equal up to float32 reassociation: batched (vmapped) and unbatched matmuls round
        # differently on some CPUs (AVX-512 kernels), and Adam's normalization can turn a
        # perturbed near-zero gradient into a small fraction of one step of size lr. 1% of one
        # step bounds that; another seed moves the adapters by many steps.
        step = c.fed.client_lr
        for u, v in zip(lx, ly):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=0.01 * step)
        with open(os.path.join(run_dir, 'config.json')) as f:  # train reproduces this run
            assert json.load(f) == json.loads(c.to_json_best_effort())
    # The seeds really differ (sampling, batches, adapter init), so the equality is not vacuous.
    finals = g['final_valid_ppl']
    assert len(set(finals)) == 3
    assert g['mean'] == pytest.approx(np.mean(finals))
    assert g['std'] == pytest.approx(np.std(finals, ddof=1))
    text = (tmp_path / 'sweep' / 'summary.md').read_text()
    assert '| base | [0, 1, 2] |' in text


def test_vmapped_hyperparameters_equal_separate_runs(corpus, backbone, tmp_path):
    """One group of three runs that differ in every kind of vmapped setting: traced learning
    rates and mu (RoundData.hparams), fate rates (RoundData.rates) and the partition's alpha."""
    base = _config(corpus, backbone)
    settings = [{}, {
        'fed.client_lr': 2 * base.fed.client_lr,
        'fed.server_lr': 0.5,
        'fed.prox_mu': 0.1,
        'fed.straggler_rate': 0.5,
        'fed.straggler_min_frac': 0.25
    }, {
        'data.partition.alpha': 10.0,
        'fed.dropout_rate': 0.2
    }]
    configs = [sweep.with_overrides(base, o, seed) for o, seed in zip(settings, (0, 0, 1))]
    specs = sweep.specs_of(configs)
    sweep.check_group('hp', configs, specs)
    records = sweep.run_group('hp', configs, str(tmp_path / 'sweep'), specs)
    assert len(records) == 3 and all(r['vmapped_runs'] == 3 for r in records)
    finals = []
    for i, (c, rec) in enumerate(zip(configs, records)):
        (run_dir, ) = rec['dirs']
        alone = str(tmp_path / f'alone{i}')
        summary = train.run(c.copy_and_resolve_references(), alone)
        with open(os.path.join(run_dir, 'summary.json')) as f:
            got = json.load(f)
        np.testing.assert_allclose(got['final_valid_ppl'], summary['final_valid_ppl'], rtol=1e-5)
        for x, y in zip(metrics_rows(run_dir), metrics_rows(alone)):
            np.testing.assert_allclose(x['train_loss'], y['train_loss'], rtol=1e-5)
            for k in ('clients_reported', 'clients_used', 'up_bytes_total'):
                assert x[k] == y[k], (i, k)
        (_, x), (_, y) = latest_state(run_dir), latest_state(alone)
        for u, v in zip(jax.tree.leaves(x['trainable']), jax.tree.leaves(y['trainable'])):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
        finals.append(got['final_valid_ppl'])
    assert len(set(finals)) == 3  # the settings really change the runs
    dropped = metrics_rows(records[2]['dirs'][0])  # and a client of the dropout run did drop
    assert sum(r['clients_reported'] for r in dropped) < sum(r['clients_sampled'] for r in dropped)
    assert os.path.basename(records[1]['dirs'][0]) == (
        'data.partition.alpha=0.3__fed.client_lr=0.02__fed.server_lr=0.5__fed.prox_mu=0.1__'
        'fed.dropout_rate=0.0__fed.straggler_rate=0.5__fed.straggler_min_frac=0.25__seed0')


def test_vmapped_fields_stay_in_one_group():
    c = ptb_fedgen_edge.get_config('tiny')
    plan = sweep.groups(c, [0, 1], [('fed.client_lr', [0.01, 0.02]), ('lora.rank', [2, 4])])
    assert [name for name, _, _ in plan] == ['lora.rank=2', 'lora.rank=4']
    assert [(x.fed.client_lr, x.seed) for x in plan[0][2]] == [(0.01, 0), (0.01, 1), (0.02, 0),
                                                               (0.02, 1)]
    a, b = c.copy_and_resolve_references(), c.copy_and_resolve_references()
    a.fed.client_lr, b.fed.client_lr = 0.0, 0.01
    # Runs vary learning rates as multiples of the first run's, which the spec keeps > 0.
    with pytest.raises(ValueError, match='fed.client_lr must be a number > 0'):
        sweep.check_group('g', [a, b], sweep.specs_of([a, b]))


def test_shape_changing_field_in_a_group_is_one_line_error(corpus):
    a, b = _config(corpus), _config(corpus)
    b.seed, b.lora.rank = 1, 4
    with pytest.raises(ValueError, match='lora.rank: 2 -> 4') as e:
        sweep.check_group('g', [a, b], sweep.specs_of([a, b]))
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='repeated runs'):
        sweep.check_group('g', [a, _config(corpus)], sweep.specs_of([a, _config(corpus)]))


def test_groups_loop_the_varied_fields():
    c = ptb_fedgen_edge.get_config('tiny')
    field, values = sweep.parse_vary('lora.rank=2,4')
    assert (field, values) == ('lora.rank', [2, 4])
    plan = sweep.groups(c, [0, 1], [(field, values)])
    assert [name for name, _, _ in plan] == ['lora.rank=2', 'lora.rank=4']
    assert [[(x.seed, x.lora.rank) for x in cs] for _, _, cs in plan] == [[(0, 2), (1, 2)],
                                                                          [(0, 4), (1, 4)]]
    with pytest.raises(ValueError, match='no field lora.nope'):
        sweep.groups(c, [0], [('lora.nope', [1])])
    with pytest.raises(ValueError, match='--seeds'):
        sweep.parse_vary('seed=1,2')


def test_stack_refuses_other_shapes_and_take_inverts_it():
    trees = [{'a': np.full((2, ), i, np.float32)} for i in range(3)]
    stacked = fsweep.stack(trees)
    assert stacked['a'].shape == (3, 2)
    assert fsweep.same_tree(fsweep.take(stacked, 1), trees[1])
    with pytest.raises(ValueError, match=r"\['a'\]"):
        fsweep.stack([trees[0], {'a': np.zeros((3, ), np.float32)}])


def test_killed_sweep_resumes_into_the_unbroken_runs_and_a_finished_one_is_read_back(
        corpus, backbone, tmp_path):
    """A kill in round 2 after seed 0 saved step 2, before seed 1's row 2: the rerun resumes every
    run from round 1 (seed 0 drops its step 2) and ends with the unbroken rows and states bit for
    bit; rerunning the finished group reads its summaries back and touches no file."""
    configs = [sweep.with_overrides(_config(corpus, backbone), {}, s) for s in (0, 1)]
    specs, work = sweep.specs_of(configs), str(tmp_path / 'sweep')
    first = sweep.run_group('base', configs, work, specs)
    dirs = first[0]['dirs']
    ref = [(metrics_rows(d), latest_state(d)) for d in dirs]
    for d in dirs:
        os.remove(os.path.join(d, 'summary.json'))
    with open(os.path.join(dirs[1], 'metrics.jsonl')) as f:
        kept = f.readlines()[:1]
    with open(os.path.join(dirs[1], 'metrics.jsonl'), 'w') as f:
        f.writelines(kept)
    shutil.rmtree(os.path.join(dirs[1], 'checkpoints', '2'))
    again = sweep.run_group('base', configs, work, specs)
    assert again[0]['final_valid_ppl'] == first[0]['final_valid_ppl']
    for d, (rows, (step, state)) in zip(dirs, ref):
        assert metrics_rows(d) == rows
        got_step, got = latest_state(d)
        assert got_step == step == 2
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    stamps = {d: os.stat(os.path.join(d, 'summary.json')).st_mtime_ns for d in dirs}
    read_back = sweep.run_group('base', configs, work, specs)
    assert read_back[0]['final_valid_ppl'] == again[0]['final_valid_ppl']
    assert read_back[0]['first_round_s'] is None  # nothing ran
    assert {d: os.stat(os.path.join(d, 'summary.json')).st_mtime_ns for d in dirs} == stamps


def test_a_finished_group_that_named_its_cached_backbone_is_read_back(corpus, backbone, tmp_path):
    """Configs without pretrain.backbone_path: the group loads the backbone cached under its
    workdir and writes that path into every config.json; a rerun with the same configs reads the
    summaries back (nothing runs), while a run of another config is not taken for it."""
    work = tmp_path / 'sweep'
    shutil.copytree(backbone, work / 'backbone' / os.path.basename(backbone))
    configs = [sweep.with_overrides(_config(corpus), {}, s) for s in (0, 1)]
    specs = sweep.specs_of(configs)
    first = sweep.run_group('base', configs, str(work), specs)
    for d in first[0]['dirs']:
        with open(os.path.join(d, 'config.json')) as f:
            path = json.load(f)['pretrain']['backbone_path']
        assert path == str(work / 'backbone' / os.path.basename(backbone))
    again = sweep.run_group('base', configs, str(work), specs)
    assert again[0]['first_round_s'] is None  # read back
    assert again[0]['final_valid_ppl'] == first[0]['final_valid_ppl']
    other = [sweep.with_overrides(c, {'fed.client_lr': 0.5}) for c in configs]
    assert sweep.finished(sweep.specs_of(other), first[0]['dirs'], str(work)) is None
    elsewhere = sweep.finished(specs, first[0]['dirs'], str(tmp_path / 'other'))
    assert elsewhere is None  # the written path is not that workdir's cache
