"""Run FedGen-Edge and every baseline with the same seed, backbone, data, splits and budget.

    python -m experiments.compare --task ptb --workdir runs/compare_ptb
    python -m experiments.compare --task ptb --quick --workdir runs/compare_quick  # ~10-15 min CPU
    python -m experiments.compare --task cifar10 --quick --workdir runs/compare_c10

Each method is configs/<task>_<method>.py, run by experiments.train in <workdir>/<method> (the
backbone is pre-trained once, by the first method, and shared through pretrain.backbone_path),
then personalized by experiments.personalize (every client, E_p = 1 local epoch; Ditto, FedSA and
local-only are evaluated with the personal trees they keep). Writes <workdir>/compare.csv,
compare.md (also printed), compare.json and convergence.png (the headline metric against rounds,
every method with a global model). --quick uses fewer clients, rounds and pre-training steps.
"""
import csv
import importlib
import json
import math
import os
import sys
import time

import matplotlib
from absl import app, flags, logging

from experiments import personalize as personal_exp
from experiments import train
from fedgen import pretrain, tasks

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

# (config suffix, label). fedavg_full's personalized column is full-model FedAvg + local FT.
METHODS = (
    ('fedgen_edge', 'FedGen-Edge (LoRA FedAvg)'),
    ('fedadam', 'LoRA FedAdam'),
    ('fedprox', 'LoRA FedProx'),
    ('ditto', 'LoRA Ditto'),
    ('fedsa', 'FedSA-LoRA (A shared, B local)'),
    ('local_only', 'local-only LoRA'),
    ('fedavg_full', 'full-model FedAvg (+FT)'),
    ('centralized', 'centralized LoRA (pooled)'),
)
# Methods whose global tree is not a trained model (FedSA keeps B = 0; local-only never averages).
NO_GLOBAL = ('fedsa', 'local_only')
QUICK = {
    'fed.num_clients': 20,
    'fed.clients_per_round': 5,
    'fed.rounds': 12,
    'fed.max_steps_per_epoch': 4,
    'eval.every': 2,
    'personalize.max_steps': 8,  # clients hold ~700 windows here: cap E_p's epoch at 8 steps
}

FLAGS = flags.FLAGS  # --workdir is experiments.train's flag (imported above)


def define_flags() -> None:
    """This command's own flags (defined only when it is the program)."""
    flags.DEFINE_string('task', 'ptb', 'ptb or cifar10.')
    flags.DEFINE_bool('quick', False, 'Fewer clients, rounds and pre-training steps.')
    flags.DEFINE_list('methods', [m for m, _ in METHODS], 'Subset of methods to run.')
    flags.DEFINE_string('backbone', '', 'A saved backbone to share (skips pre-training).')
    flags.DEFINE_integer('epochs', None, 'Personalization epochs E_p (default: the config\'s).')


def log(msg: str) -> None:
    print(msg, flush=True)


def set_field(config, dotted: str, value) -> None:
    node, name = config, dotted.rsplit('.', 1)
    for part in name[0].split('.'):
        node = node[part]
    node[name[1]] = value


def method_config(task: str, method: str, arg: str, overrides: dict):
    """configs/<task>_<method>.py:<arg> with the dotted ``overrides`` applied."""
    try:
        module = importlib.import_module(f'configs.{task}_{method}')
    except ModuleNotFoundError as e:
        raise ValueError(f'--methods: no config configs/{task}_{method}.py') from e
    config = module.get_config(arg)
    for k, v in overrides.items():
        set_field(config, k, v)
    return config


def run(task: str,
        workdir: str,
        methods=None,
        quick: bool = False,
        arg: str = '',
        overrides: dict | None = None,
        backbone: str = '',
        epochs: int | None = None) -> list[dict]:
    """Runs every method; returns the table rows (also written to workdir)."""
    task_mod = tasks.get(task)
    names = [m for m, _ in METHODS] if methods is None else list(methods)
    labels = dict(METHODS)
    bad = [m for m in names if m not in labels]
    if bad:
        raise ValueError(f'--methods: unknown {bad}; choose from {list(labels)}')
    overrides = {**(QUICK if quick else {}), **(overrides or {})}
    configs = {m: method_config(task, m, arg, overrides) for m in names}
    os.makedirs(workdir, exist_ok=True)
    shared = backbone
    data = None
    rows = []
    for m in names:
        cfg = configs[m]
        if shared:
            cfg.pretrain.backbone_path = shared
        if 'metrics' in cfg:  # one fd_classifier for every method
            cfg.metrics.cache_dir = workdir
        wd = os.path.join(workdir, m)
        log(f'=== {labels[m]} ({m}) -> {wd}')
        t0 = time.time()
        summary = train.run(cfg, wd)
        t_train = time.time() - t0
        if not shared:  # the first method pre-trained it: everyone else loads the same weights
            shared = os.path.join(wd, 'backbone', pretrain.recipe_hash(task_mod.recipe(cfg)))
        restored = personal_exp.restore(cfg, wd, task=data)
        data = restored['task']  # same data/splits for every method: prepare once here
        t1 = time.time()
        e_p = cfg.personalize.epochs if epochs is None else epochs
        res, client_rows, psum = personal_exp.run_personalize(cfg, wd, e_p, restored)
        personal_exp.write(wd, client_rows, psum)
        t_pers = time.time() - t1
        metric = task_mod.METRIC
        glob = float('nan') if m in NO_GLOBAL else summary.get(f'final_{metric}', float('nan'))
        rows.append({
            'method':
            labels[m],
            'key':
            m,
            f'global_{metric}':
            glob,
            f'clients_global_{psum["metric"]}':
            float('nan') if m in NO_GLOBAL else psum['mean_global'],
            f'clients_personal_{psum["metric"]}':
            psum['mean_personal'],
            'share_improved':
            psum['share_improved'],
            'up_MB_round':
            summary['up_bytes_per_round'] / 1e6,
            'up_MB_total':
            summary['up_bytes_total'] / 1e6,
            'train_s':
            round(t_train, 1),
            'personalize_s':
            round(t_pers, 1),
            'backbone_metric':
            summary.get(f'backbone_{metric}', float('nan')),
        })
        log(f'--- {m}: ' + ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in rows[-1].items() if k not in ('method', 'key')))
    write_table(workdir, rows)
    plot(workdir, names, labels, task_mod.METRIC, rows)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ('key', 'backbone_metric')]

    def cell(v):
        if isinstance(v, float):
            return 'n/a' if math.isnan(v) else f'{v:.4g}'
        return str(v)

    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    lines += ['| ' + ' | '.join(cell(r[k]) for k in keys) + ' |' for r in rows]
    return '\n'.join(lines)


def write_table(workdir: str, rows: list[dict]) -> None:
    with open(os.path.join(workdir, 'compare.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = markdown(rows)
    with open(os.path.join(workdir, 'compare.md'), 'w') as f:
        f.write(md + '\n')
    with open(os.path.join(workdir, 'compare.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    log(f'backbone (no training): {rows[0]["backbone_metric"]:.4g}\n{md}')


def plot(workdir: str, names: list[str], labels: dict, metric: str, rows: list[dict]) -> None:
    """convergence.png: metric vs rounds for every method with a global model."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in names:
        if m in NO_GLOBAL:
            continue
        with open(os.path.join(workdir, m, 'metrics.jsonl')) as f:
            pts = [json.loads(x) for x in f if x.strip()]
        pts = [(r['round'], r[metric]) for r in pts if metric in r]
        if pts:
            ax.plot(*zip(*pts), marker='o', ms=3, label=labels[m])
    ax.axhline(rows[0]['backbone_metric'], color='gray', ls=':', label='backbone (round 0)')
    ax.set_xlabel('round')
    ax.set_ylabel(metric)
    ax.set_yscale('log')
    ax.set_title(f'global-model {metric} (FedSA and local-only have no global model)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'convergence.png'), dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required')
    try:
        run(FLAGS.task,
            FLAGS.workdir,
            FLAGS.methods,
            quick=FLAGS.quick,
            backbone=FLAGS.backbone,
            epochs=FLAGS.epochs)
    except ValueError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
