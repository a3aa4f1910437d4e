"""Kill harness: SIGKILL the training process at chosen moments, resume until done, and compare
with an unbroken run.

    python -m experiments.chaos --root runs/chaos --kills 20 --seed 0 -- \
        --config configs/ptb_fedgen_edge.py:tiny --config.fed.rounds=12 \
        --config.data.source=/path/to/ptb --config.data.verify_md5=False

Everything after ``--`` is passed to ``python -m experiments.train`` (without --workdir). The
harness first runs the job unbroken in <root>/ref, recording when its phases start. Then, in
<root>/chaos, it starts the same job, kills it (the whole process group, SIGKILL) at a moment
drawn from MOMENTS, restarts it, and so on until ``kills`` kills have landed; a last start runs
to completion. The moments:

    pretrain      a random instant of backbone pre-training (timed from its stdout bar)
    cache_save    while Orbax writes the backbone cache (its tmp directory exists)
    round         a random instant after the rounds loop starts (compute, evaluation, rows),
                  within a 1/kills share of the unbroken run's rounds phase
    async_save    while an asynchronous round checkpoint is being written (tmp directory)
    after_commit  right after a round checkpoint commits (before the next round's row)
    after_row     after a round's row is in metrics.jsonl, before its checkpoint commits
    random        a random instant from the start (start-up, then that share of the rounds)

Then it checks, against the unbroken run: the final checkpoint's state bit for bit, the backbone
cache digest, metrics.jsonl (exactly one row per round, equal values apart from wall-clock keys
``*_s``), and summary.json (same). Both runs share a persistent XLA compilation cache
(<root>/xla_cache), so restarts skip compilation; a cached executable is the same program.
"""
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

MOMENTS = ('pretrain', 'cache_save', 'round', 'async_save', 'after_commit', 'after_row', 'random')
_TMP = '.orbax-checkpoint-tmp'
# Phases seen on the job's stdout: a tqdm bar ('pretrain:  45%|', on a terminal) or the plain
# progress lines of experiments.console.progress ('pretrain 20/20 [...]', on a file or a pipe).
MARKERS = (('pretrain', re.compile(r'(^|[\r\n])pretrain[: ]')),
           ('pretrain_done', re.compile(r'pretrain: 100%|(^|[\r\n])pretrain (\d+)/\2 ')),
           ('data', re.compile(r'\ndata: \{')), ('rounds', re.compile(r'(^|[\r\n])rounds[: ]')))


@dataclasses.dataclass
class Attempt:
    moment: str | None  # None: run to completion
    killed: bool
    seconds: float  # wall time of the attempt
    rc: int | None  # exit status when it was not killed
    log: str  # path of the attempt's stdout + stderr
    marks: dict  # first time (s) each phase was seen: 'pretrain', 'pretrain_done', 'data', ...


def _read(path: str) -> str:
    with open(path, 'rb') as f:
        return f.read().decode(errors='replace')


def _committed_steps(workdir: str) -> set[str]:
    d = os.path.join(workdir, 'checkpoints')
    return {n for n in os.listdir(d) if n.isdigit()} if os.path.isdir(d) else set()


def _backbone_done(workdir: str) -> bool:
    return bool(glob.glob(os.path.join(workdir, 'backbone', '*', 'content.sha256.json')))


def _row_ahead(workdir: str) -> bool:
    """True while metrics.jsonl holds a row of a round whose checkpoint is not committed yet."""
    try:
        with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
            lines = f.read().splitlines()
        last = json.loads(lines[-1])['round'] if lines else 0
    except (OSError, ValueError, KeyError):
        return False  # absent, or caught mid-replace
    return last > max((int(s) for s in _committed_steps(workdir)), default=0)


def attempt(cmd: list[str], workdir: str, log: str, env: dict, moment: str | None, param: float,
            timeout: float) -> Attempt:
    """Starts ``cmd`` once and kills it at ``moment``, or lets it finish (``moment`` None).

    ``param``: the delay in seconds after the pre-training bar appears ('pretrain'), after the
    rounds loop starts ('round'), or after the start ('random'). A watched moment whose phase
    passes between two polls is still killed, right after, and labelled '<moment>~late'.
    """
    start_steps = _committed_steps(workdir)
    marks, fire_at = {}, None
    t0 = time.time()
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd,
                                stdout=out,
                                stderr=subprocess.STDOUT,
                                env=env,
                                start_new_session=True)
        while proc.poll() is None:
            now = time.time() - t0
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f'attempt ran past {timeout:.0f}s; see {log}')
            text = _read(log) if moment in (None, 'pretrain', 'round') else ''
            for key, marker in MARKERS:
                if key not in marks and marker.search(text):
                    marks[key] = now
            new_steps = len(_committed_steps(workdir) - start_steps)
            fire = late = False
            if moment == 'pretrain' and 'pretrain' in marks:
                # Pre-training runs in jitted segments of many steps, so the bar barely moves:
                # the kill is timed from the bar's appearance, and late once it shows 100%.
                fire = now >= marks['pretrain'] + param
                late = 'pretrain_done' in marks or _backbone_done(workdir)
            elif moment == 'round' and 'rounds' in marks:
                fire_at = fire_at if fire_at is not None else marks['rounds'] + param
            elif moment == 'random':
                fire_at = param
            elif moment == 'cache_save':
                fire = bool(glob.glob(os.path.join(workdir, 'backbone', f'*{_TMP}*')))
                late = _backbone_done(workdir)
            elif moment == 'async_save':
                fire = bool(glob.glob(os.path.join(workdir, 'checkpoints', f'*{_TMP}*')))
                late = new_steps >= 2
            elif moment == 'after_commit':
                fire = new_steps >= 1
            elif moment == 'after_row':
                fire = _row_ahead(workdir)
                late = new_steps >= 2
            if fire or late or (fire_at is not None and now >= fire_at):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: any helper processes too
                proc.wait()
                label = f'{moment}~late' if late else moment
                return Attempt(label, True, time.time() - t0, None, log, marks)
            time.sleep(0.005)
    return Attempt(moment, False, time.time() - t0, proc.returncode, log, marks)


def plan(kills: int, rng: np.random.Generator) -> list[str]:
    """``kills`` moments: the pre-training ones first (while they can still happen), then the
    watched round moments in random order, then random draws of the timed ones."""
    early, watched, timed = ['pretrain', 'cache_save'], ['async_save', 'after_commit',
                                                         'after_row'], ['round', 'random']
    rest = list(rng.permutation(watched)) + list(rng.permutation(timed))
    extra = list(rng.choice(watched + timed, size=max(0, kills - len(MOMENTS))))
    return (early + rest + extra)[:kills]


def chaos(cmd: list[str], workdir: str, env: dict, kills: int, ref: Attempt, seed: int,
          timeout: float) -> list[Attempt]:
    """Kills the job ``kills`` times at the planned moments, then lets it finish."""
    rng = np.random.default_rng([seed, 0xC4A05])
    rounds = ref.seconds - ref.marks.get('rounds', 0.0)
    # The unbroken run compiled everything; restarts load from the XLA cache and are faster.
    pre = ref.marks.get('pretrain_done', 0.0) - ref.marks.get('pretrain', 0.0)
    out = []
    for moment in plan(kills, rng):
        if moment in ('pretrain', 'cache_save') and _backbone_done(workdir):
            moment = 'round'  # pre-training is over for this run
        # Timed kills draw from a 1/kills share of the rounds phase, so that the run outlives
        # all of them instead of finishing after the first few long draws.
        share = rounds / max(1, kills)
        param = {
            'pretrain': rng.uniform(0.0, 0.25 * pre),
            'round': rng.uniform(0.0, share),
            'random': rng.uniform(0.0,
                                  ref.marks.get('rounds', 0.0) + share)
        }.get(moment, 0.0)
        log = os.path.join(os.path.dirname(workdir), f'attempt{len(out):02d}_{moment}.log')
        a = attempt(cmd, workdir, log, env, moment, param, timeout)
        out.append(a)
        if not a.killed:
            if a.rc != 0:
                raise RuntimeError(f'attempt {len(out)} ({moment}) exited {a.rc}: '
                                   f'{_read(log)[-2000:]}')
            return out  # the run finished before the kill landed
    log = os.path.join(os.path.dirname(workdir), f'attempt{len(out):02d}_final.log')
    a = attempt(cmd, workdir, log, env, None, 0.0, timeout)
    if a.rc != 0:
        raise RuntimeError(f'the final attempt exited {a.rc}: {_read(log)[-2000:]}')
    return out + [a]


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def _steady(d: dict) -> dict:
    """A row or summary without its wall-clock entries (keys ending in '_s')."""
    return {k: v for k, v in d.items() if not k.endswith('_s')}


def final_state(workdir: str) -> tuple[int, dict]:
    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
    step = mngr.latest_step()
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, got['state']


def compare(ref_dir: str, run_dir: str) -> list[str]:
    """Differences between the two workdirs' results (empty when they agree)."""
    import jax
    problems = []
    (s1, a), (s2, b) = final_state(ref_dir), final_state(run_dir)
    if s1 != s2:
        problems.append(f'final step {s2} != {s1}')
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    if [p for p, _ in la] != [p for p, _ in lb]:
        problems.append('final state trees differ in structure')
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            problems.append(f'final state {jax.tree_util.keystr(path)} differs')
    digests = [
        sorted(
            _read(p) for p in glob.glob(os.path.join(d, 'backbone', '*', 'content.sha256.json')))
        for d in (ref_dir, run_dir)
    ]
    if digests[0] != digests[1]:
        problems.append(f'backbone cache digests differ: {digests}')
    ra, rb = _rows(ref_dir), _rows(run_dir)
    rounds = [r['round'] for r in rb]
    if rounds != list(range(1, len(ra) + 1)):
        problems.append(f'metrics.jsonl rounds are {rounds}, want 1..{len(ra)}')
    for x, y in zip(ra, rb):
        if _steady(x) != _steady(y):
            keys = sorted(k for k in set(_steady(x)) | set(_steady(y)) if x.get(k) != y.get(k))
            problems.append(f'round {x["round"]} row differs in {keys}')
    sa, sb = (json.loads(_read(os.path.join(d, 'summary.json'))) for d in (ref_dir, run_dir))
    if _steady(sa) != _steady(sb):
        keys = sorted(k for k in set(_steady(sa)) | set(_steady(sb)) if sa.get(k) != sb.get(k))
        problems.append(f'summary.json differs in {keys}')
    for k in ('up_bytes_total', 'down_bytes_total'):
        if sa.get(k) != sb.get(k):
            problems.append(f'{k}: {sb.get(k)} != {sa.get(k)}')
    return problems


def run(root: str, train_args: list[str], kills: int, seed: int, timeout: float = 900.0) -> dict:
    """The unbroken run, the killed-and-resumed run, and their comparison (a JSON-safe dict)."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ,
               JAX_COMPILATION_CACHE_DIR=os.path.join(root, 'xla_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
               PYTHONUNBUFFERED='1')
    base = [sys.executable, '-m', 'experiments.train'] + list(train_args)
    ref_dir, run_dir = os.path.join(root, 'ref'), os.path.join(root, 'chaos')
    os.makedirs(ref_dir, exist_ok=True)
    ref = attempt(base + ['--workdir', ref_dir], ref_dir, os.path.join(root, 'ref.log'), env, None,
                  0.0, timeout)
    if ref.rc != 0:
        raise RuntimeError(f'the unbroken run exited {ref.rc}: {_read(ref.log)[-2000:]}')
    os.makedirs(run_dir, exist_ok=True)
    attempts = chaos(base + ['--workdir', run_dir], run_dir, env, kills, ref, seed, timeout)
    landed = [a.moment for a in attempts if a.killed]
    return {
        'kills': len(landed),
        'moments': landed,
        'attempt_s': [round(a.seconds, 1) for a in attempts],
        'unbroken_s': round(ref.seconds, 1),
        'problems': compare(ref_dir, run_dir)
    }


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', required=True, help='directory for both runs and the logs')
    p.add_argument('--kills', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--timeout', type=float, default=900.0, help='seconds per attempt')
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != '--']
    report = run(args.root, rest, args.kills, args.seed, args.timeout)
    print(json.dumps(report, indent=1))
    return 1 if report['problems'] else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
