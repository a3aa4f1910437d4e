"""Personalize a finished run: every client fine-tunes its own adapter from the global one.

    python -m experiments.personalize --workdir runs/ptb
    python -m experiments.personalize --workdir runs/ptb --config configs/ptb_fedgen_edge.py \
        --epochs 1

Reads the run's config (``<workdir>/config.json``, or ``--config``), restores the final server
state, fine-tunes all fed.num_clients clients for --epochs local epochs (methods that keep personal
trees, e.g. Ditto, FedSA, local-only, use those instead), evaluates every client on its local test
split with the global and the personal tree, and writes into the workdir:
personal/<round>/ (the stacked personal trees, Orbax), personalization.csv (one row per client),
personalization_gains.png (histogram of per-client gains) and personalization.json (summary).
It prints the share of clients improved, the median and 10th/90th-percentile gain, and samples of
2-3 personalized clients beside the global model (text, or an image grid for image tasks).
"""
import csv
import json
import os
import sys
import time

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments import train
from fedgen import algorithms, checkpoint, personalize, tasks
from fedgen.algorithms import optim

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

FLAGS = flags.FLAGS  # --config and --workdir are experiments.train's flags (imported above)


def define_flags() -> None:
    """This command's own flags (defined only when it is the program, so modules importing it
    do not collide)."""
    flags.DEFINE_integer(
        'epochs', None,
        'Local personalization epochs E_p (>= 0); default config.personalize.epochs')
    flags.DEFINE_integer('show', 3, 'Personalized clients to sample from (0 = none).')


def log(msg: str) -> None:
    print(msg, flush=True)


def load_config(workdir: str, config=None):
    """``config`` if given, else the run's saved <workdir>/config.json."""
    if config is not None:
        return config
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise ValueError(f'--workdir {workdir} has no config.json; pass --config')
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def metric_of(task_mod) -> tuple[str, callable]:
    """The per-client metric from a mean loss: PPL = exp(L) for text, the loss itself else."""
    if task_mod.METRIC.endswith('ppl'):
        return 'ppl', np.exp
    return 'denoise_mse', lambda x: x


def restore(config, workdir: str, task=None) -> dict:
    """The finished run's task, frozen tree, method and final state (round = latest step)."""
    task_mod = tasks.get(config.task)
    task = task_mod.prepare(config) if task is None else task
    params, _ = train.backbone(config, task, task_mod, workdir)
    method = algorithms.get(config.fed.algorithm)
    rng = jax.random.PRNGKey(config.seed)
    frozen, trainable = method.variables(params, config, jax.random.fold_in(rng, 1))
    alg = method.make(config, task.loss_fn)
    state = alg.init(trainable, jax.random.fold_in(rng, 2))
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    step = checkpoint.latest(mngr)
    if step is None:
        raise ValueError(f'--workdir {workdir} has no checkpoint (run experiments.train first)')
    state = checkpoint.restore(mngr, step, state=state)['state']
    return dict(task_mod=task_mod, task=task, method=method, frozen=frozen, state=state, step=step)


def run_personalize(config, workdir: str, epochs: int, run: dict) -> tuple:
    """(Personalized, rows, summary) for the restored ``run``; no files written."""
    fed, task = config.fed, run['task']
    keep = getattr(run['method'], 'personal', None)
    pc = config.personalize
    res = personalize.personalize(
        task.loss_fn,
        optim.build(pc.opt, pc.lr, 'personalize.opt', 'personalize.lr'),
        run['frozen'],
        run['state'].trainable,
        task.pool,
        task.client_train,
        task.client_test,
        epochs=epochs,
        batch_size=fed.batch_size,
        seed=config.seed,
        chunk=fed.client_chunk,
        eval_batch_size=fed.batch_size,  # N clients x B examples in memory at once
        max_steps=pc.max_steps,
        personal=None if keep is None else keep(run['state']))
    name, fn = metric_of(run['task_mod'])
    g, p = fn(res.global_loss), fn(res.personal_loss)
    rows = [{
        'client': k,
        'n_train': len(task.client_train[k]),
        'n_test': len(task.client_test[k]),
        'global_loss': float(res.global_loss[k]),
        'personal_loss': float(res.personal_loss[k]),
        f'global_{name}': float(g[k]),
        f'personal_{name}': float(p[k]),
        'gain': float(g[k] - p[k])
    } for k in range(len(task.client_train))]
    summary = {'metric': name, 'epochs': epochs, 'round': int(run['step'])}
    summary.update(personalize.gain_summary(g, p))
    return res, rows, summary


def histogram(rows: list[dict], summary: dict, path: str) -> None:
    """Fig. 5-style histogram of per-client gains (global minus personal metric)."""
    gain = np.array([r['gain'] for r in rows if np.isfinite(r['gain'])])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(gain, bins=min(30, max(5, len(gain) // 3)), color='tab:blue', alpha=0.8)
    ax.axvline(0.0, color='k', lw=1)
    ax.axvline(summary['median_gain'], color='tab:red', ls='--', lw=1.2, label='median')
    m = summary['metric'].upper()
    ax.set_xlabel(f'{m} reduction after personalization (global - personal)')
    ax.set_ylabel('clients')
    ax.set_title(f'{100 * summary["share_improved"]:.0f}% of {summary["clients"]} clients improve '
                 f'(E_p={summary["epochs"]})')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show_samples(config, run: dict, personal, rows: list[dict], count: int, workdir: str) -> None:
    """Samples of the global model beside ``count`` personalized clients (same sampling key):
    the clients with the largest, median and smallest gain."""
    order = sorted((r for r in rows if np.isfinite(r['gain'])), key=lambda r: -r['gain'])
    if count <= 0 or not order:
        return
    picks = [order[0], order[len(order) // 2], order[-1]][:count]
    key = jax.random.PRNGKey(config.seed + 7)
    sample = lambda tree: run['task_mod'].samples(run['task'], config, {
        **run['frozen'],
        **tree
    }, key)
    outs = [('global', sample(run['state'].trainable))]
    for r in picks:
        tree = jax.tree.map(lambda x, k=r['client']: x[k], personal)
        outs.append((f'client {r["client"]} (gain {r["gain"]:+.3g})', sample(tree)))
    if isinstance(outs[0][1], np.ndarray):  # image task: one grid, a row per model
        from experiments import plots
        path = os.path.join(workdir, 'personal_samples.png')
        plots.image_grid(np.concatenate([o for _, o in outs]), path, cols=len(outs[0][1]))
        log(f'samples (rows: {", ".join(n for n, _ in outs)}): {path}')
        return
    for name, texts in outs:
        log(f'{name}:\n' + '\n'.join(f'  > {t}' for t in texts))


def write(workdir: str, rows: list[dict], summary: dict) -> None:
    with open(os.path.join(workdir, 'personalization.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(workdir, 'personalization.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    histogram(rows, summary, os.path.join(workdir, 'personalization_gains.png'))


def main_run(config, workdir: str, epochs: int | None, show: int) -> dict:
    t0 = time.time()
    config = load_config(workdir, config)
    epochs = config.personalize.epochs if epochs is None else epochs
    run = restore(config, workdir)
    log(f'restored {config.fed.algorithm} round {run["step"]}; personalizing '
        f'{len(run["task"].client_train)} clients for {epochs} epoch(s)')
    res, rows, summary = run_personalize(config, workdir, epochs, run)
    path = checkpoint.save_personal(workdir, run['step'], res.personal)
    write(workdir, rows, summary)
    summary['wall_s'] = round(time.time() - t0, 1)
    m = summary['metric']
    log(f'personal trees: {path}')
    log(f'clients improved: {100 * summary["share_improved"]:.1f}% of {summary["clients"]}; '
        f'{m} gain median {summary["median_gain"]:.3f} (p10 {summary["p10_gain"]:.3f}, '
        f'p90 {summary["p90_gain"]:.3f}); mean {m} global {summary["mean_global"]:.3f} -> '
        f'personal {summary["mean_personal"]:.3f}  ({summary["wall_s"]} s)')
    log(f'wrote {workdir}/personalization.csv, personalization_gains.png, personalization.json')
    show_samples(config, run, res.personal, rows, show, workdir)
    return summary


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required')
    try:
        main_run(FLAGS.config, FLAGS.workdir, FLAGS.epochs, FLAGS.show)
    except ValueError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
