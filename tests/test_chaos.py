"""Kills at any moment: SIGKILL the tiny PTB run 6 times (pre-training, the cache save, a round,
an async checkpoint save, right after a commit, right after a row), resume until done, and
compare with an unbroken run bit for bit (experiments/chaos.py is the long version)."""
import os

import pytest

from experiments import chaos

pytestmark = pytest.mark.heavy  # kills and resumes whole runs

KILLS = 6


def test_kills_then_resume_equal_unbroken(corpus, tmp_path):
    args = [
        '--config', 'configs/ptb_fedgen_edge.py:tiny', f'--config.data.source={corpus}',
        '--config.data.verify_md5=False', '--config.fed.rounds=8'
    ]
    root = str(tmp_path / 'chaos')
    report = chaos.run(root, args, kills=KILLS, seed=0, timeout=600.0)
    assert report['kills'] >= 5, report
    # Under heavy load a watched window can pass between two polls; the kill then lands right
    # after it ('<moment>~late'), which still tests a resume from that point.
    landed = {m.split('~')[0] for m in report['moments']}
    assert {'pretrain', 'cache_save', 'async_save', 'after_commit', 'after_row'} <= landed, report
    assert report['problems'] == [], report
    # The comparison is not vacuous: both runs finished all 8 rounds.
    assert len(chaos._rows(os.path.join(root, 'chaos'))) == 8


def test_compare_sees_a_changed_row_and_state(corpus, tmp_path):
    """The checker itself: a missing row, a changed value and a changed state are reported."""
    import shutil

    import jax.numpy as jnp

    from fedgen.io import checkpoint
    ref = tmp_path / 'ref'
    for d in ('checkpoints', ):
        (ref / d).mkdir(parents=True)
    m = checkpoint.manager(str(ref), 2)
    checkpoint.save(m, 2, state={'w': jnp.arange(4.0)})
    checkpoint.wait(m)
    rows = [{'round': 1, 'loss': 1.0, 'round_s': 3.0}, {'round': 2, 'loss': 0.5, 'round_s': 2.0}]
    (ref / 'metrics.jsonl').write_text(''.join(f'{r}\n'.replace("'", '"') for r in rows))
    (ref / 'summary.json').write_text('{"up_bytes_total": 10, "wall_s": 1.0}')
    run = tmp_path / 'run'
    shutil.copytree(ref, run)
    assert chaos.compare(str(ref), str(run)) == []
    (run / 'metrics.jsonl').write_text('{"round": 2, "loss": 0.25, "round_s": 1.0}\n')
    (run / 'summary.json').write_text('{"up_bytes_total": 5, "wall_s": 9.0}')
    shutil.rmtree(run / 'checkpoints')
    m = checkpoint.manager(str(run), 2)
    checkpoint.save(m, 2, state={'w': jnp.arange(4.0) + 1e-7})
    checkpoint.wait(m)
    problems = ' | '.join(chaos.compare(str(ref), str(run)))
    assert "final state ['w'] differs" in problems
    assert 'rounds are [2]' in problems and 'round 1 row differs' in problems
    assert 'up_bytes_total: 5 != 10' in problems
