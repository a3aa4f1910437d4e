"""Run FedGen-Edge and every baseline with the same seed, backbone, data, splits and budget.

    python -m experiments.compare --task ptb --workdir runs/compare_ptb
    python -m experiments.compare --task ptb --quick --workdir runs/compare_quick  # ~10-15 min CPU
    python -m experiments.compare --task cifar10 --quick --workdir runs/compare_c10

Each method is configs/<task>_<method>.py, run by experiments.train.run in <workdir>/<method>
(the backbone is pre-trained once, by the first method, and shared through
pretrain.backbone_path), then personalized by experiments.personalize's functions (the same
columns for every method: backbone, global (n/a for FedSA and local-only), personal = kept trees
or the global model fine-tuned E_p epochs). Writes <workdir>/compare.csv, compare.md (also
printed), compare.json and convergence.png (the headline metric against rounds, every method
with a global model). --quick uses fewer clients, rounds and pre-training steps.
"""
import csv
import importlib
import json
import math
import os
import time

import matplotlib
from absl import flags

from experiments import personalize as personal_exp
from experiments import train, translate
from experiments.console import log, require, run_main
from fedgen.fl import pretrain

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
QUICK = {
    'fed.num_clients': 20,
    'fed.clients_per_round': 5,
    'fed.rounds': 12,
    'fed.max_steps_per_epoch': 4,
    'eval.every': 2,
    'personalize.max_steps': 8,  # clients hold ~700 windows here: cap E_p's epoch at 8 steps
}


def define_flags() -> None:
    """This command's own flags (defined only when it is the program)."""
    flags.DEFINE_string('workdir', None, 'Output directory (one sub-directory per method).')
    flags.DEFINE_string('task', 'ptb', 'ptb or cifar10.')
    flags.DEFINE_bool('quick', False, 'Fewer clients, rounds and pre-training steps.')
    flags.DEFINE_list('methods', [m for m, _ in METHODS], 'Subset of methods to run.')
    flags.DEFINE_string('backbone', '', 'A saved backbone to share (skips pre-training).')
    flags.DEFINE_integer('epochs', None, 'Personalization epochs E_p (default: the config\'s).')


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
        spec = translate.spec(cfg)  # this method's one translation: its run, then personalization
        summary = train.run(spec, wd)
        t_train = time.time() - t0
        restored = personal_exp.restore(spec, wd, task=data)
        data = restored['task']  # same data/splits for every method: prepare once here
        if not shared:  # the first method pre-trained it: everyone else loads the same weights
            shared = os.path.join(wd, 'backbone', pretrain.recipe_hash(data.recipe))
        t1 = time.time()
        e_p = spec.personalize.epochs if epochs is None else epochs
        _, client_rows, psum = personal_exp.run_personalize(spec, e_p, restored)
        personal_exp.write(wd, client_rows, psum)
        t_pers = time.time() - t1
        rows.append(table_row(m, labels[m], data.metric, summary, psum, t_train, t_pers))
        log(f'--- {m}: ' + ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in rows[-1].items() if k not in ('method', 'key')))
    write_table(workdir, rows)
    plot(workdir, rows, data.metric)
    return rows


def table_row(key: str, label: str, metric: str, summary: dict, psum: dict, t_train: float,
              t_pers: float) -> dict:
    """One method's row: NaN marks a column that does not apply (shown as n/a)."""
    nan = float('nan')
    m = psum['metric']
    has_global = psum['has_global']
    vs_g, vs_b = psum['vs_global'], psum['vs_backbone']
    return {
        'method':
        label,
        'key':
        key,
        'has_global':
        has_global,
        f'global_{metric}':
        summary.get(f'final_{metric}', nan) if has_global else nan,
        f'clients_backbone_{m}':
        psum['mean_backbone'],
        f'clients_global_{m}':
        psum['mean_global'] if has_global else nan,
        f'clients_personal_{m}':
        psum['mean_personal'],
        'personal':
        psum['personal_source'],
        'finetune_epochs':
        (float(psum['finetune_epochs']) if psum['finetune_epochs'] is not None else nan),
        'share_improved_vs_global':
        vs_g['share_improved'] if vs_g else nan,
        'share_improved_vs_backbone':
        vs_b['share_improved'],
        'shares_over':
        psum['shares_over'],
        'up_MB_round':
        summary['up_bytes_per_round'] / 1e6,
        'down_MB_client_round':
        summary['down_bytes_per_client_round'] / 1e6,
        'up_MB_total':
        summary['up_bytes_total'] / 1e6,
        'down_MB_total':
        summary['down_bytes_total'] / 1e6,
        'train_s':
        round(t_train, 1),
        'personalize_s':
        round(t_pers, 1),
        'backbone_metric':
        summary.get(f'backbone_{metric}', nan),
    }


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ('key', 'backbone_metric', 'has_global')]

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


def plot(workdir: str, rows: list[dict], metric: str) -> None:
    """convergence.png: metric vs rounds for every method with a global model."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        if not r['has_global']:
            continue
        with open(os.path.join(workdir, r['key'], 'metrics.jsonl')) as f:
            pts = [json.loads(x) for x in f if x.strip()]
        pts = [(p['round'], p[metric]) for p in pts if metric in p]
        if pts:
            ax.plot(*zip(*pts), marker='o', ms=3, label=r['method'])
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
    require('workdir')
    f = flags.FLAGS
    run(f.task, f.workdir, f.methods, quick=f.quick, backbone=f.backbone, epochs=f.epochs)


if __name__ == '__main__':
    define_flags()
    run_main(main)
