"""experiments.claims (the verdict rules), measures/report formatting and the scale description.

Each rule test pairs a case the old rules overstated (one seed, overlapping spreads, a rank
curve inside the noise) with one where the data do separate, so both verdicts are reachable.
"""
import copy

import numpy as np
import pytest

from experiments import claims, measures, report_lm, scales

H, F, U, X = claims.HOLDS, claims.FAILS, claims.UNSURE, claims.UNTESTABLE


def test_compare_needs_disjoint_intervals_and_two_seeds():
    assert claims.compare([1.0, 1.2], [3.0, 3.2]) == claims.LOWER
    assert claims.compare([3.0, 3.2], [1.0, 1.2]) == claims.HIGHER
    assert claims.compare([1.0, 2.0], [1.8, 2.8]) == claims.WITHIN  # 1.5+0.71 > 2.3-0.71
    assert claims.compare([1.0], [5.0, 5.1]) == claims.SINGLE
    with pytest.raises(ValueError, match='both sides'):
        claims.compare([], [1.0])


def test_claim_lower_one_seed_is_inconclusive_either_way():
    assert claims.claim_lower([10], [20], 'ppl')[0] == U  # was 'holds'
    assert claims.claim_lower([12], [11], 'ppl')[0] == U  # was 'does not hold'
    assert claims.claim_lower([10, 10.5], [20], 'ppl')[0] == U
    verdict, why = claims.claim_lower([5.5], [20.9], 'FD')
    assert '(n = 1)' in why and '± 0' not in why


def test_claim_lower_needs_separated_spreads():
    assert claims.claim_lower([10, 11, 12], [20, 21, 22], 'ppl')[0] == H
    assert claims.claim_lower([20, 21, 22], [10, 11, 12], 'ppl')[0] == F
    assert claims.claim_lower([10, 14], [11, 15], 'ppl')[0] == U  # lower mean, overlapping
    assert claims.claim_lower([345.7, 344.6, 345.9], [341.2, 342.3, 340.7], 'ppl')[0] == F
    assert claims.claim_lower([12, 13], [11, 14], 'ppl')[0] == U  # higher mean, overlapping
    assert claims.claim_lower([None, float('nan')], [11], 'ppl')[0] == X


def test_claim_personal_needs_two_seeds():
    assert claims.claim_personal([(0.97, 0.93, 1.0)])[0] == U  # was 'holds'
    assert claims.claim_personal([(0.8, 0.7, 0.9), (0.85, 0.75, 0.93)])[0] == H
    assert claims.claim_personal([(0.8, 0.7, 0.9), (0.6, 0.45, 0.75)])[0] == U
    assert claims.claim_personal([(0.3, 0.2, 0.4), (0.35, 0.25, 0.45)])[0] == F
    assert claims.claim_personal([(float('nan'), ) * 3])[0] == X


def test_claim_rank_single_seed_is_inconclusive():
    # the checked-in cpu report's numbers: one seed per rank (three at the base rank)
    ppl = [[349.8], [347.3], [345.7, 344.6, 345.9], [343.4], [344.2], [348.6]]
    verdict, why = claims.claim_rank([1, 2, 4, 8, 16, 32], ppl)
    assert verdict == U  # was 'holds' ("diminishing returns")
    assert 'one seed' in why and 'r16: 344.2 (n = 1)' in why and 'r4: 345.4 ± 0.7 (n = 3)' in why


def test_claim_rank_within_noise_is_not_diminishing_returns():
    # r=16/32 slightly worse than r=8, inside the seed spread; r=1 -> r=8 a measurable gain
    ppl = [[350, 351], [347, 347.6], [346, 346.5], [343, 344], [343.4, 344.8], [343.9, 344.5]]
    verdict, why = claims.claim_rank([1, 2, 4, 8, 16, 32], ppl)
    assert verdict == H
    assert 'r=16 vs r=8: within seed spread: no measurable gain' in why
    assert 'r=32 vs r=8: within seed spread' in why and 'worse' not in why
    # the same means with a large spread: nothing is measurable
    noisy = [[m - 6, m + 6] for m in map(np.mean, ppl)]
    verdict, why = claims.claim_rank([1, 2, 4, 8, 16, 32], noisy)
    assert verdict == U and 'no rank measurably below r=1' in why
    # a measurable decline above the plateau is named as such
    decline = ppl[:4] + [[350, 351], [355, 356]]
    verdict, why = claims.claim_rank([1, 2, 4, 8, 16, 32], decline)
    assert verdict == H and 'r=32 vs r=8: measurably worse' in why
    # gains that go on to the largest rank: no plateau
    steady = [[100 - 10 * i, 101 - 10 * i] for i in range(4)]
    assert claims.claim_rank([1, 2, 4, 8], steady)[0] == F
    assert claims.claim_rank([8, 1, 4], [[74, 75], [100, 101], [74.5, 75.5]])[0] == H
    assert claims.claim_rank([1, 2], [[100, 101], [90, 91]])[0] == X


def test_claim_epochs_needs_seeds_and_separation():
    e = [1, 2, 5]
    assert claims.claim_epochs(e, [[100], [90], [95]], [[0.1], [0.2], [0.4]])[0] == U
    drift = [[0.1, 0.11], [0.2, 0.21], [0.4, 0.41]]
    plateau = [[100, 101], [90, 91], [90.5, 91.2]]
    assert claims.claim_epochs(e, plateau, drift)[0] == H
    steady = [[100, 101], [95, 96], [85, 86]]  # the last step gains more than the first
    assert claims.claim_epochs(e, steady, drift)[0] == F
    assert claims.claim_epochs(e, plateau, drift[::-1])[0] == F  # drift falls
    flat = [[0.1, 0.5], [0.2, 0.3], [0.3, 0.45]]  # drift inside its spread
    assert claims.claim_epochs(e, plateau, flat)[0] == U
    assert claims.claim_epochs(e, plateau, [drift[0], [None], drift[2]])[0] == X


def _personal_summary(mean, backbone, clients):
    return {
        'personal_source': 'kept',
        'vs_backbone': {
            'mean_personal': mean,
            'mean_reference': backbone,
            'clients': clients
        }
    }


def test_method_without_global_model_shows_na_and_its_personal_metric():
    backbone = 366.7  # what FedSA's 'final_valid_ppl' holds: its global B stays 0
    fedsa = {
        'summary': {
            'final_valid_ppl': backbone
        },
        'rows': [],
        'has_global': False,
        'personal': {
            'summary': _personal_summary(301.25, 370.5, 87)
        }
    }
    edge = {'summary': {'final_valid_ppl': 345.7}, 'rows': []}
    ptb = {
        'fedgen_edge': measures.method_stats(edge, 'valid_ppl'),
        'fedsa': measures.method_stats(fedsa, 'valid_ppl')
    }
    assert ptb['fedsa']['mean'] is None and ptb['fedsa']['personal']['mean'] == 301.25
    rows = {r.split(' | ')[0][2:]: r for r in report_lm.ptb_table(ptb) if r.startswith('| fed')}
    assert rows['fedsa'].startswith('| fedsa | n/a | n/a | 301.2 ')
    assert '366.7' not in rows['fedsa']
    assert '87 clients' in rows['fedsa']
    assert rows['fedgen_edge'].startswith('| fedgen_edge | 345.7 (n = 1) |')
    assert 'not measured' in rows['fedgen_edge']


def test_single_run_prints_n_equals_1_not_plus_minus_zero():
    one = measures.stats({'runs': [{'summary': {'final_valid_ppl': 344.4}}]}, 'valid_ppl')
    two = measures.stats({'runs': [{
        'summary': {
            'final_valid_ppl': v
        }
    } for v in (1.0, 3.0)]}, 'valid_ppl')
    assert report_lm.ms(one) == '344.4 (n = 1)'
    assert report_lm.ms(two) == '2 ± 1.414'
    failed = measures.stats({'runs': [{'summary': {}}]}, 'valid_ppl')
    assert report_lm.ms(failed) == 'failed'


def test_scale_description_is_derived_from_the_scale_dict():
    sc = copy.deepcopy(scales.SCALES['cpu'])
    text = scales.describe('cpu', sc)
    assert 'configs/ptb_smollm2_<method>.py:cpu with 8 rounds' in text
    assert 'seeds [0, 1, 2] (n = 3)' in text and 'the whole splits' in text
    assert 'LoRA rank r in [2, 8, 32]: seeds [0, 1] (n = 2)' in text
    assert 'window split on the first main FedGen-Edge run (n = 1)' in text
    assert ("FedGen-Edge's client lr 0.01, chosen on [0.001, 0.003, 0.01, 0.03] (seed 0, lowest "
            'final valid PPL; the grid runs under --tune)') in text
    assert 'on the test split' in text
    assert 'Dirichlet alpha: not run' in text and 'CIFAR-10: not run' in text
    assert 'Fashion-MNIST: a backbone pre-trained for 8000 steps' in text
    st = sc['ptb']
    st['over']['fed.rounds'] = 7
    st['over']['fed.max_steps_per_epoch'] = 9
    st['rank_seeds'] = (0, 1, 2, 3)
    st['alphas'], st['alpha_seeds'] = (0.05, ), (0, )
    st['whole'] = None
    del st['window_runs']  # default: as many runs as the document split's seeds
    del st['edge_lrs']  # default: the config's lr
    del st['pinned_lrs']  # the grid chooses in the run
    sc['small_gpt'] = None
    sc['synthetic_data'] = True
    sc['fmnist'] = None
    changed = scales.describe('mine', sc)
    assert changed != text
    assert '7 rounds' in changed and '8 rounds' not in changed
    assert 'at most 9 local steps' in changed
    assert 'r in [2, 8, 32]: seeds [0, 1, 2, 3] (n = 4)' in changed
    assert 'alpha in [0.05]: seed 0 (n = 1)' in changed and 'Second study: not run' in changed
    assert 'scored by the per-round protocol' in changed and 'whole splits' not in changed
    assert 'window split on the first 2 main FedGen-Edge runs (n = 2)' in changed
    assert "FedGen-Edge at its config's client lr" in changed
    assert "full FedAvg's client lr chosen on [3e-05, 0.0001, 0.0003, 0.001] (seed 0, lowest " \
        'final valid PPL);' in changed
    assert 'Fashion-MNIST: not run' in changed
    assert "Scale 'mine'" in changed and 'synthetic' in changed and 'synthetic' not in text
    st['over']['new.knob'] = 3  # a key without words is still shown
    assert 'new.knob=3' in scales.describe('mine', sc)


def test_whole_split_table_shows_the_splits_that_were_scored():
    """A study scored on the test split only (scales' whole['splits']): the measures, the table
    and claim 2's metric name that split; nothing is shown for the unscored one."""
    final = lambda ppl: {
        'test_ppl': ppl,
        'test_window': 256,
        'test_stride': 224,
        'test_words': 82430
    }
    p = {
        'whole': {
            'fedgen_edge': [final(90.0), final(92.0)],
            'fedavg_full': [final(80.0)],
            'backbone': final(189.0)
        }
    }
    w = measures.whole(p)
    assert w['splits'] == ['test'] and w['backbone'] == {'test': 189.0}
    assert w['protocol'] == {'window': 256, 'stride': 224, 'test_words': 82430}
    assert w['fedgen_edge']['test']['per_seed'] == [90.0, 92.0]
    lines = report_lm.whole_table(w)
    text = '\n'.join(lines)
    assert 'W = 82430 test words' in text and 'validation' not in text and 'valid' not in text
    assert lines[2] == '| model | test PPL (mean ± std) | per seed |'
    assert all(x.count('|') == 4 for x in lines[2:])
    row = next(x for x in lines if x.startswith('| fedavg_full'))
    assert '(n = 1)' in row and '80' in row


def test_lr_grid_says_when_the_chosen_lr_is_at_the_grid_s_edge():
    at_edge = report_lm.lr_grid({1e-4: 90.0, 3e-4: 80.0}, 3e-4, 'Full FedAvg')
    assert at_edge.startswith("Full FedAvg's client learning rate, tuned on seed 0")
    assert 'chosen 0.0003.' in at_edge and 'edge of the grid' in at_edge
    inside = report_lm.lr_grid({1e-4: 90.0, 3e-4: 80.0, 1e-3: 85.0}, 3e-4, 'FedGen-Edge')
    assert 'edge' not in inside and '0.001: 85' in inside
    assert 'not tuned' in report_lm.lr_grid({}, 1e-4, 'FedGen-Edge')


def test_lr_grid_of_a_pinned_lr_says_what_ran_and_whether_the_pin_is_the_best():
    lrs = (1e-4, 3e-4, 1e-3)
    none = report_lm.lr_grid({}, 3e-4, 'Full FedAvg', lrs, pinned=True)
    assert none.startswith("Full FedAvg's client learning rate: 0.0003, pinned by the scale")
    assert 'Not run in this workdir: [0.0001, 0.0003, 0.001].' in none and '--tune' in none
    part = report_lm.lr_grid({3e-4: 80.0}, 3e-4, 'Full FedAvg', lrs, pinned=True)
    assert 'Not run in this workdir: [0.0001, 0.001]; finished: 0.0003: 80.' in part
    whole = {1e-4: 90.0, 3e-4: 80.0, 1e-3: 85.0}
    good = report_lm.lr_grid(whole, 3e-4, 'Full FedAvg', lrs, pinned=True)
    assert good.endswith('chosen 0.0003. It is pinned by the scale (the grid runs under `--tune`).')
    stale = report_lm.lr_grid(whole, 1e-3, 'Full FedAvg', lrs, pinned=True)
    assert "The scale pins it, but the grid's best is 0.0003: the pin is stale." in stale


def test_a_pinned_lr_computes_no_grid_run_without_tune(tmp_path, monkeypatch):
    """experiments.lm_study.tuned: with the scale's pin and no --tune, unfinished grid runs are
    left out (nothing runs) and finished ones read back; --tune runs what is missing; the pin,
    not the grid's best, sets the lr; without a pin the grid's best does."""
    from experiments import lm_study, sweep, writers
    ran, real = [], writers.finished
    monkeypatch.setattr(sweep, 'run_group', lambda name, *a: ran.append(name))
    st = dict(config='ptb_smollm2', arg='tiny', pinned_lrs={'fedavg_full': 3e-4})
    tuned = lambda st, tune: lm_study.tuned(st, 'fedavg_full',
                                            (1e-4, 3e-4), {}, str(tmp_path), {}, tune)
    config, grid = tuned(st, False)
    assert ran == [] and grid == {} and config.fed.client_lr == 3e-4
    finished = lambda record, d: {'final_valid_ppl': 9.0} if 'lr0.0001' in d else real(record, d)
    monkeypatch.setattr(writers, 'finished', finished)
    monkeypatch.setattr(lm_study, 'read_rows', lambda d: [])
    config, grid = tuned(st, False)
    assert ran == [] and list(grid) == [1e-4] and config.fed.client_lr == 3e-4
    config, grid = tuned(st, True)
    assert ran == ['fedavg_full_lr0.0003'] and list(grid) == [1e-4, 3e-4]
    assert config.fed.client_lr == 3e-4  # pinned, though the finished 1e-4 scores better
    config, _ = tuned(dict(config='ptb_smollm2', arg='tiny'), False)
    assert config.fed.client_lr == 1e-4  # no pin: the grid's best
