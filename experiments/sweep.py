"""Many federated runs as one compiled program: seeds and traced settings vmapped, the rest looped.

    python -m experiments.sweep --config configs/ptb_fedgen_edge.py:tiny --seeds 0,1,2 \
        --workdir runs/sweep --config.data.source=DIR --config.data.verify_md5=False
    python -m experiments.sweep --config configs/ptb_fedgen_edge.py --seeds 0,1,2 \
        --vary lora.rank=2,4,8 --vary fed.clients_per_round=5,10 --workdir runs/sweep_rank

Settings that change no shape and no compiled constant of the round are vmapped (VMAPPED): the
seed, the client and server learning rates and FedProx's mu (traced per run through
RoundData.hparams, fedgen/fl/hparams.py: the compiled optimizers' updates scaled by lr / lr_0 of the
group's first run), the Dirichlet alpha of the partition (each run packs its own clients) and the
fate rates (RoundData.rates). A group is the base config with one combination of the other --vary
values (ranks, clients per round, models, LoRA alpha: looped), and its R runs are every
combination of the vmapped --vary values and the seeds. They share every shape and compiled
constant and run as one jitted round, ``vmap(apply, in_axes=(0, None, 0))`` over states [R, ...]
and round data [R, C, S, ...] (fedgen/fl/runs.py), the frozen backbone passed once (in_axes None).

Run r is the run ``experiments.train`` makes with that seed (prepare.setup and prepare.round_data
per run: its own partition, client sampling, batch order, adapter init and rng), with one choice:
the backbone. Pre-training is seeded; a group pre-trains once, from its first seed (cached in
<workdir>/backbone/<recipe hash>), and every run names it in pretrain.backbone_path, so each run's
config.json reproduces it with experiments.train. A given pretrain.backbone_path is used as is;
runs whose backbones still differ (pretrain.steps 0: a seeded init) are refused. S is the largest
of the group's local step counts; a run with fewer gets masked padding steps (exact no-ops).

The round loop and all writing are experiments.trainer's, the same as train's (R = 1 there): each
<workdir>/<group>/<run>/ (run: seed<k>, after field=value__ for each vmapped setting that differs
inside the group) holds config.json, metrics.jsonl (train's row keys; round_s is the vmapped round
plus the run's own evaluation), TensorBoard events, summary.json (train's keys, plus seed and
vmapped_runs) and checkpoints/ (every round); <workdir>/summary.{md,json} holds per group the final
validation metric's mean ± std (n - 1) over seeds. A diverged run stops writing rows and is
reported as failed; the others go on. A killed sweep resumes like train (every run from the
newest round all its runs hold); a run dir of another config is refused unless
checkpoint.overwrite. A sweep draws no samples. The command enables the persistent XLA cache
(<workdir>/xla_cache): every run's evaluator is a new function with the same program.
"""
import ast
import itertools
import json
import os
import statistics
import sys
import time

import jax
from absl import flags
from ml_collections import config_flags

from experiments import prepare, trainer, translate, writers
from experiments.console import log, require, run_main
from experiments.runspec import RunSpec
from fedgen.fl import fates
from fedgen.fl import hparams
from fedgen.fl import runs as fsweep

# Settings a vmapped group may vary per run (everything else is compiled into the round).
HPARAM_FIELDS = ('fed.client_lr', 'fed.server_lr', 'fed.prox_mu')
RATE_FIELDS = ('fed.dropout_rate', 'fed.straggler_rate', 'fed.straggler_min_frac')
VMAPPED = ('seed', 'data.partition.alpha') + HPARAM_FIELDS + RATE_FIELDS


def parse_vary(spec: str) -> tuple[str, list]:
    """'lora.rank=2,4' -> ('lora.rank', [2, 4]); values are Python literals, else strings."""
    field, sep, values = spec.partition('=')
    if not sep or not field or not values:
        raise ValueError(f'--vary must be FIELD=V1,V2,..., got {spec!r}')
    if field == 'seed':
        raise ValueError('--vary cannot vary the seed: use --seeds (seeds are vmapped)')

    def value(text):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    return field, [value(v.strip()) for v in values.split(',')]


def with_overrides(config, overrides: dict, seed: int | None = None):
    """A copy of ``config`` with dotted-field ``overrides`` (and ``seed``) set."""
    c = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        *path, last = dotted.split('.')
        node = c
        for p in path:
            node = node.get(p) if hasattr(node, 'get') else None
        if node is None or not hasattr(node, 'keys') or last not in node:
            raise ValueError(f'--vary: the config has no field {dotted}')
        node[last] = value
    if seed is not None:
        c.seed = seed
    return c


def groups(config, seeds: list[int], vary: list[tuple[str, list]]) -> list[tuple[str, dict, list]]:
    """(name, overrides, one config per run) for every combination of the looped --vary values;
    a group's runs are every combination of the vmapped --vary values (VMAPPED) and the seeds."""
    looped = [(f, vs) for f, vs in vary if f not in VMAPPED]
    vmapped = [[(f, v) for v in vs] for f, vs in vary if f in VMAPPED]
    out = []
    for combo in itertools.product(*[[(f, v) for v in vs] for f, vs in looped]):
        overrides = dict(combo)
        name = '__'.join(f'{f}={v}' for f, v in combo) or 'base'
        configs = [
            with_overrides(config, {
                **overrides,
                **dict(per_run)
            }, s) for per_run in itertools.product(*vmapped) for s in seeds
        ]
        out.append((name, overrides, configs))
    return out


def _get(config, dotted: str):
    node = config
    for p in dotted.split('.'):
        node = node[p]
    return node


def varied(configs: list) -> list[str]:
    """The VMAPPED fields (seed excluded) whose values differ between the runs of a group."""
    return [f for f in VMAPPED[1:] if len({_get(c, f) for c in configs}) > 1]


def run_name(config, fields: list[str]) -> str:
    """A run's directory in its group: 'seed<k>', after 'field=value__' per varied field."""
    return '__'.join([f'{f}={_get(config, f)}' for f in fields] + [f'seed{config.seed}'])


def traced(configs: list) -> list[dict]:
    """Per run, the RoundData fields that carry its vmapped settings: hparams (learning rates as
    multiples of the first run's, and mu) when a group varies one of HPARAM_FIELDS, rates when it
    varies one of RATE_FIELDS; {} when the group varies only seeds and partitions."""
    fields, c0 = varied(configs), configs[0]
    out = [{} for _ in configs]
    if any(f in HPARAM_FIELDS for f in fields):
        for o, c in zip(out, configs):
            o['hparams'] = hparams.HParams.of(c.fed.client_lr / c0.fed.client_lr,
                                              c.fed.server_lr / c0.fed.server_lr, c.fed.prox_mu)
    if any(f in RATE_FIELDS for f in fields):
        for o, c in zip(out, configs):
            o['rates'] = fates.FateRates.of(c.fed.dropout_rate, c.fed.straggler_rate,
                                            c.fed.straggler_min_frac)
    return out


def specs_of(configs: list) -> list[RunSpec]:
    """Every run's RunSpec (translate.spec: every field and pairing checked, before any data)."""
    return [translate.spec(c) for c in configs]


def check_group(name: str, configs: list, specs: list[RunSpec]) -> None:
    """One-line ValueErrors: runs of one vmapped group (``configs`` and their RunSpecs
    ``specs``, :func:`specs_of`) may differ in VMAPPED settings only."""
    names = [run_name(c, varied(configs)) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f'group {name}: repeated runs {names}')
    ref = json.loads(specs[0].record)
    for n, s in zip(names[1:], specs[1:]):
        diff = writers.config_conflict(ref, json.loads(s.record), free=VMAPPED)
        if diff:
            raise ValueError(
                f'group {name}: run {n} differs from run {names[0]} in '
                f'{"; ".join(diff)}; only {", ".join(VMAPPED)} are vmapped (settings '
                'that change shapes or compiled constants are separate groups: --vary)')
    s0 = specs[0]  # learning rates are > 0 (translate.spec): the others' multiples exist
    if len(configs) > 1 and s0.method.faults.attack != 'none':
        raise ValueError(f'group {name}: fed.attack draws its attackers from the seed when the '
                         'round is compiled; sweep attacks one seed per group')
    if len({s.method.client_ranks for s in specs}) > 1:
        raise ValueError(f'group {name}: lora.client_ranks draws the ranks from the seed when the '
                         'round is compiled; sweep heterogeneous ranks one seed per group')
    if s0.mesh() is not None:
        raise ValueError(f'a sweep runs on one device; set fed.num_devices=1 (got '
                         f'{s0.clients.num_devices} of {jax.device_count()} devices)')


def run_dirs(name: str, configs: list, workdir: str) -> list[str]:
    """<workdir>/<group>/<run> of every run (run_name)."""
    return [os.path.join(workdir, name, run_name(c, varied(configs))) for c in configs]


def setup_runs(name: str, configs: list, specs: list[RunSpec],
               workdir: str) -> list[trainer.Member]:
    """prepare.setup for every run; the first one pre-trains (or loads) the shared backbone and
    every run's pretrain.backbone_path names it (module docstring)."""
    s0 = specs[0]
    r0 = prepare.setup(s0, workdir)
    pre = s0.settings.pretrain
    if not pre.backbone_path and pre.steps > 0:
        path = os.path.abspath(r0['bb_info']['source'])
        specs = [s.with_backbone(path) for s in specs]
    dirs = run_dirs(name, configs, workdir)
    for s, d in zip(specs, dirs):
        os.makedirs(d, exist_ok=True)
        prepare.check_workdir(s, d)
    n, members = len(configs), []
    for i, (s, d, t) in enumerate(zip(specs, dirs, traced(configs))):
        r = r0 if i == 0 else prepare.setup(s, workdir)
        if not fsweep.same_tree(r['frozen'], r0['frozen']):
            raise ValueError(f'group {name}: seed {s.seed} has another frozen backbone than seed '
                             f'{s0.seed}; give the group one pretrain.backbone_path')
        r = {**r, 'params': r0['params'], 'frozen': r0['frozen']}
        extra = {'seed': s.seed, 'metric': r['task'].metric, 'vmapped_runs': n}
        members.append(trainer.Member(s, r, d, workdir, t, extra))
    return members


def resolved(spec: RunSpec, run_dir: str, workdir: str) -> RunSpec:
    """``spec`` as :func:`setup_runs` wrote it to ``run_dir``/config.json: an empty
    pretrain.backbone_path (steps > 0) names the group's cached backbone under
    ``workdir``/backbone/, which the written config holds (every other field, the backbone's
    recipe among them, is still compared by writers.finished)."""
    pre = spec.settings.pretrain
    path = os.path.join(run_dir, 'config.json')
    if pre.backbone_path or pre.steps <= 0 or not os.path.isfile(path):
        return spec
    with open(path) as f:
        written = json.load(f).get('pretrain', {}).get('backbone_path', '')
    cache = os.path.join(os.path.abspath(workdir), 'backbone', '')
    if written.startswith(cache) and os.path.isdir(written):
        return spec.with_backbone(written)
    return spec


def finished(specs: list[RunSpec], dirs: list[str], workdir: str) -> list[dict] | None:
    """Every run's summary when every run finished with exactly its config (writers.finished,
    the backbone :func:`resolved`), else None."""
    done = [writers.finished(resolved(s, d, workdir).record, d) for s, d in zip(specs, dirs)]
    return done if all(s is not None and 'metric' in s for s in done) else None


def run_group(name: str, configs: list, workdir: str, specs: list[RunSpec]) -> list:
    """Runs (or resumes) one vmapped group with trainer.train; returns its records for
    summary.json, one per setting of the varied VMAPPED fields (the final metric's mean ± std
    over that setting's seeds). A group whose runs all finished is read back, not recomputed.
    ``specs``: the configs' RunSpecs (:func:`specs_of`, translated once by the caller)."""
    t_start = time.time()
    check_group(name, configs, specs)
    dirs, n = run_dirs(name, configs, workdir), len(configs)
    finals, times = finished(specs, dirs, workdir), []
    if finals is not None:
        log(f'group {name}: every run finished with this config; their summaries')
    else:
        runs = setup_runs(name, configs, specs, workdir)
        log(f'group {name}: {n} runs ({", ".join(os.path.basename(d) for d in dirs)}) on one '
            f'run axis; C={specs[0].clients.capacity}, '
            f'S={max(r.setup["steps"] for r in runs)}')
        finals, times = trainer.train(runs, samples=False, t_start=t_start)
        finals = [{**f, 'metric': r.setup['task'].metric} for r, f in zip(runs, finals)]
    timing = {
        'first_round_s': round(times[0], 3) if times else None,
        'round_s_median': round(statistics.median(times[1:] or times), 3) if times else None,
        'wall_s': round(time.time() - t_start, 1)
    }
    fields, settings_of = varied(configs), {}
    for c, d, f in zip(configs, dirs, finals):
        key = '__'.join(f'{x}={_get(c, x)}' for x in fields)
        settings_of.setdefault(key, []).append((c, d, f))
    records = []
    for key, members in settings_of.items():
        metric = members[0][2]['metric']
        vals = [f.get(f'final_{metric}') for _, _, f in members]
        ok = [v for v in vals if v is not None]
        records.append({
            'group': f'{name}__{key}' if key else name,
            'metric': metric,
            'seeds': [c.seed for c, _, _ in members],
            'dirs': [d for _, d, _ in members],
            f'final_{metric}': vals,
            'mean': statistics.fmean(ok) if ok else None,
            'std': statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else None),
            'failed': {
                c.seed: f['error']
                for c, _, f in members if 'error' in f
            },
            'vmapped_runs': n,
            **timing
        })
    return records


def _num(v) -> str:
    return 'n/a' if v is None else f'{v:.4g}'


def markdown(records: list[dict], command: str) -> str:
    """summary.md: one row per group, the final validation metric's mean ± std over seeds."""
    cols = [
        'group', 'seeds', 'final (mean ± std)', 'per seed', 'failed', 'round s (median)',
        'first round s', 'wall s'
    ]
    lines = [
        f'# Sweep\n\n`{command}`\n', f'jax {jax.__version__}, {jax.default_backend()}; '
        'std over seeds with n - 1; round s: one vmapped round of all the group\'s runs.\n',
        '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)
    ]
    for g in records:
        per = ', '.join(_num(v) for v in g[f'final_{g["metric"]}'])
        lines.append(f'| {g["group"]} | {g["seeds"]} | {g["metric"]} {_num(g["mean"])} ± '
                     f'{_num(g["std"])} | {per} | {len(g["failed"])} | {g["round_s_median"]} | '
                     f'{g["first_round_s"]} | {g["wall_s"]} |')
    return '\n'.join(lines) + '\n'


def run_sweep(config, seeds: list[int], workdir: str, vary=(), command: str = '') -> list[dict]:
    """Every group of (config, --vary) over ``seeds``; writes <workdir>/summary.{json,md}."""
    if not seeds:
        raise ValueError('--seeds must name at least one seed')
    plan = [(*g, specs_of(g[2])) for g in groups(config, list(seeds), list(vary))]
    for name, _, configs, specs in plan:  # every group's errors before any compute
        check_group(name, configs, specs)
    os.makedirs(workdir, exist_ok=True)
    records = []
    for name, overrides, configs, specs in plan:
        for g in run_group(name, configs, workdir, specs):
            records.append({**g, 'overrides': overrides})
            log(f'{g["group"]}: final {g["metric"]} {g["mean"]} ± {g["std"]} over seeds '
                f'{g["seeds"]}')
    writers.write_atomic(os.path.join(workdir, 'summary.json'), json.dumps(records, indent=1))
    writers.write_atomic(os.path.join(workdir, 'summary.md'), markdown(records, command))
    return records


FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
    flags.DEFINE_list('seeds', ['0'], 'Seeds, vmapped inside every group.')
    flags.DEFINE_multi_string(
        'vary', [], 'FIELD=V1,V2,...: vmapped inside a group for the VMAPPED fields, else one '
        'group per value (looped).')
    flags.DEFINE_string('workdir', None, 'Parent directory of the runs.')


def main(argv):
    del argv
    require('config', 'workdir')
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise ValueError(f'--seeds must be integers, got {FLAGS.seeds}') from None
    if not jax.config.jax_compilation_cache_dir:  # each run's evaluator compiles the same HLO
        jax.config.update('jax_compilation_cache_dir', os.path.join(FLAGS.workdir, 'xla_cache'))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    run_sweep(FLAGS.config, seeds, FLAGS.workdir, [parse_vary(v) for v in FLAGS.vary],
              ' '.join(['python -m experiments.sweep'] + sys.argv[1:]))


if __name__ == '__main__':
    define_flags()
    run_main(main)
