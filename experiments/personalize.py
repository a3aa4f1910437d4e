"""Personalize a finished run and report the same columns for every method.

    python -m experiments.personalize --workdir runs/ptb
    python -m experiments.personalize --workdir runs/ptb --config configs/ptb_fedgen_edge.py \
        --epochs 1

Reads the run's config (``<workdir>/config.json``, or ``--config``) and restores its final server
state. Each client's personal model is the method's kept tree (Ditto, FedSA, local-only) or the
global model fine-tuned for E_p = --epochs local epochs (fedgen.fl.personalization). Every client is
evaluated on its local test split with the backbone alone, the global model (n/a for FedSA and
local-only, which have none) and its personal model. Writes into the workdir: personal/<round>/
(the stacked personal trees, Orbax), personalization.csv (one row per client),
personalization.json (the summary), personalization_gains.png (per-client gains), and prints
samples of 2-3 personalized clients beside the global model.

Columns (one definition for every method; 'n/a' cells are empty in the CSV, null in the JSON):
client, n_train, n_test; rounds_sampled (training rounds that sampled the client); trained (it
was sampled and, for methods that keep per-client trees, its tree moved from the initial one);
backbone_<m>, global_<m>, personal_<m> (m = ppl for text, denoise_mse for images) and their
losses; gain_vs_global = global - personal, gain_vs_backbone = backbone - personal. For methods
that keep trees, untrained clients (still the initial tree) are left out of the shares.
"""
import csv
import dataclasses
import json
import math
import os
import time

import jax
import matplotlib
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import backbones, writers
from experiments import translate
from experiments.runspec import RunSpec
from experiments.console import log, require, run_main
from fedgen import algorithms
from fedgen.io import checkpoint
from fedgen.fl import personalization as personalize
from fedgen.metrics import plots
from fedgen.algorithms import optim

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def define_flags() -> None:
    """This command's own flags (defined only when it is the program, so modules importing its
    functions do not collide)."""
    config_flags.DEFINE_config_file('config', None, 'Config file; default <workdir>/config.json.')
    flags.DEFINE_string('workdir', None, 'The finished run (experiments.train --workdir).')
    flags.DEFINE_integer(
        'epochs', None,
        'Local personalization epochs E_p (>= 0); default config.personalize.epochs')
    flags.DEFINE_integer('show', 3, 'Personalized clients to sample from (0 = none).')


def load_config(workdir: str, config=None):
    """``config`` if given, else the run's saved <workdir>/config.json."""
    if config is not None:
        return config
    return writers.run_config(workdir)


def restore(spec: RunSpec, workdir: str, task=None) -> dict:
    """The finished run's task, backbone, frozen tree, method, and its initial and final states
    (round = the latest checkpoint). ``task`` reuses already prepared data."""
    task = spec.prepare_task() if task is None else task
    spec.preflight(task.backbone_shapes())
    rng = jax.random.PRNGKey(spec.seed)
    params, _ = backbones.pretrained(spec, task, workdir, rng)
    p, alg = spec.make_algorithm(task.loss_fn)
    frozen, trainable = algorithms.variables(p, params, jax.random.fold_in(rng, 1))
    initial = alg.init(trainable, jax.random.fold_in(rng, 2))
    mngr = checkpoint.manager(workdir, spec.schedule.keep)
    step = checkpoint.latest(mngr)
    if step is None:
        raise ValueError(f'--workdir {workdir} has no checkpoint (run experiments.train first)')
    state = checkpoint.restore(mngr, step, state=initial)['state']
    return dict(
        task=task,
        method=p,
        alg=alg,
        backbone={'params': params},
        frozen=alg.effective_frozen(state, frozen),  # W0 + dW (FedEx-LoRA, FLoRA)
        initial=initial,
        state=state,
        step=step)


def rounds_sampled(spec: RunSpec, step: int) -> np.ndarray:
    """[N] int: how many of the training rounds 0..step-1 sampled each client."""
    count = np.zeros(spec.clients.num_clients, np.int64)
    for rnd in range(step):
        ids, present = spec.sample_round(rnd)
        ids = np.asarray(ids)
        if present is not None:
            ids = ids[np.asarray(present, bool)]
        np.add.at(count, ids, 1)
    return count


def _cell(v):
    """A CSV/JSON cell: NaN (a column that does not apply, or no test data) -> None."""
    return None if isinstance(v, float) and math.isnan(v) else v


def run_personalize(spec: RunSpec, epochs: int, run: dict) -> tuple:
    """(Personalized, rows, summary) for the restored ``run``; no files written."""
    fed, task, p, alg = spec.clients, run['task'], run['method'], run['alg']
    kept = alg.personal is not None
    pc = spec.personalize
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
        seed=spec.seed,
        chunk=fed.chunk,
        eval_batch_size=fed.batch_size,  # N clients x B examples in memory at once
        max_steps=pc.max_steps,
        personal=alg.personal(run['state']) if kept else None,
        backbone=run['backbone'],
        has_global=p.has_global)
    sampled = rounds_sampled(spec, run['step'])
    trained = sampled > 0
    if kept:  # a sampled client that dropped out every time still holds the initial tree
        trained &= personalize.moved_rows(run['state'].clients, run['initial'].clients)
    name, fn = task.client_metric
    b, g, q = fn(res.backbone_loss), fn(res.global_loss), fn(res.personal_loss)
    rows = [{
        'client': k,
        'n_train': len(task.client_train[k]),
        'n_test': len(task.client_test[k]),
        'rounds_sampled': int(sampled[k]),
        'trained': bool(trained[k]),
        'backbone_loss': _cell(float(res.backbone_loss[k])),
        'global_loss': _cell(float(res.global_loss[k])),
        'personal_loss': _cell(float(res.personal_loss[k])),
        f'backbone_{name}': _cell(float(b[k])),
        f'global_{name}': _cell(float(g[k])),
        f'personal_{name}': _cell(float(q[k])),
        'gain_vs_global': _cell(float(g[k] - q[k])),
        'gain_vs_backbone': _cell(float(b[k] - q[k]))
    } for k in range(len(task.client_train))]
    summary = {'method': p.name, 'metric': name, 'round': int(run['step'])}
    summary.update(personalize.summary(fn, res, trained, kept, epochs))
    return res, rows, summary


def histogram(rows: list[dict], summary: dict, path: str) -> None:
    """Fig. 5-style histogram of per-client gains against the global model (or, for methods
    without one, against the backbone)."""
    ref = 'global' if summary['has_global'] else 'backbone'
    col = f'gain_vs_{ref}'
    use = [
        r for r in rows
        if r[col] is not None and (r['trained'] or summary['personal_source'] != 'kept')
    ]
    gain = np.array([r[col] for r in use])
    s = summary[f'vs_{ref}']
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(gain, bins=min(30, max(5, len(gain) // 3)), color='tab:blue', alpha=0.8)
    ax.axvline(0.0, color='k', lw=1)
    ax.axvline(s['median_gain'], color='tab:red', ls='--', lw=1.2, label='median')
    m = summary['metric'].upper()
    ax.set_xlabel(f'{m} reduction by the personal model ({ref} - personal)')
    ax.set_ylabel('clients')
    how = (f'E_p={summary["finetune_epochs"]}'
           if summary['finetune_epochs'] is not None else summary['personal_source'])
    ax.set_title(f'{summary["method"]}: {100 * s["share_improved"]:.0f}% of {s["clients"]} '
                 f'{summary["shares_over"]} improve ({how})')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show_samples(spec: RunSpec, run: dict, personal, rows: list[dict], count: int,
                 workdir: str) -> None:
    """Samples of the global model (or the backbone, for methods without one) beside ``count``
    trained clients (same key): those with the largest, median and smallest gain."""
    col = 'gain_vs_global' if run['method'].has_global else 'gain_vs_backbone'
    order = sorted((r for r in rows if r[col] is not None and r['trained']), key=lambda r: -r[col])
    if count <= 0 or not order:
        return
    task = run['task']
    picks = [order[0], order[len(order) // 2], order[-1]][:count]
    key = jax.random.PRNGKey(spec.seed + 7)
    if run['method'].has_global:
        outs = [('global', task.sample({**run['frozen'], **run['state'].trainable}, key))]
    else:
        outs = [('backbone', task.sample(run['backbone'], key))]
    for r in picks:
        tree = jax.tree.map(lambda x, k=r['client']: x[k], personal)
        outs.append((f'client {r["client"]} (gain {r[col]:+.3g})',
                     task.sample({
                         **run['frozen'],
                         **tree
                     }, key)))
    if task.sample_kind == 'images':  # one grid, a row per model
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


def describe(summary: dict) -> str:
    """The summary in two or three lines."""
    m = summary['metric']
    out = [
        f'{summary["method"]} round {summary["round"]}: personal = {summary["personal_source"]}'
        f' (E_p {summary["finetune_epochs"] if summary["finetune_epochs"] is not None else "n/a"}'
        f'); {summary["clients_trained"]} of {summary["clients_tested"]} tested clients trained'
    ]
    for ref in ('global', 'backbone'):
        s = summary[f'vs_{ref}']
        if s is None:
            out.append(f'  vs {ref}: n/a (the method has no {ref} model)')
            continue
        out.append(f'  vs {ref}: {100 * s["share_improved"]:.1f}% of {s["clients"]} '
                   f'{summary["shares_over"]} improve; {m} gain median {s["median_gain"]:.3f} '
                   f'(p10 {s["p10_gain"]:.3f}, p90 {s["p90_gain"]:.3f}); mean {m} '
                   f'{s["mean_reference"]:.3f} -> {s["mean_personal"]:.3f}')
    return '\n'.join(out)


def settings(spec: RunSpec, epochs: int | None = None) -> dict:
    """The personalize.* settings a personalization of ``spec`` runs with (``epochs`` overrides
    E_p): what caches of its results are keyed on."""
    out = dataclasses.asdict(spec.personalize)
    return out if epochs is None else {**out, 'epochs': epochs}


def main_spec(spec: RunSpec, workdir: str, epochs: int | None, show: int) -> dict:
    """Personalizes the finished run in ``workdir`` with RunSpec ``spec`` (its personalize.*
    settings may differ from the run's own: training never reads them); writes the files;
    returns the summary, its settings under 'personalize'."""
    t0 = time.time()
    epochs = spec.personalize.epochs if epochs is None else epochs
    run = restore(spec, workdir)
    log(f'restored {spec.method.name} round {run["step"]}; personalizing '
        f'{len(run["task"].client_train)} clients')
    res, rows, summary = run_personalize(spec, epochs, run)
    summary['personalize'] = settings(spec, epochs)
    path = checkpoint.save_personal(workdir, run['step'], res.personal)
    write(workdir, rows, summary)
    summary['wall_s'] = round(time.time() - t0, 1)
    log(f'personal trees: {path}')
    log(describe(summary) + f'  ({summary["wall_s"]} s)')
    log(f'wrote {workdir}/personalization.csv, personalization_gains.png, personalization.json')
    show_samples(spec, run, res.personal, rows, show, workdir)
    return summary


def main_run(config, workdir: str, epochs: int | None, show: int) -> dict:
    """:func:`main_spec` with the spec of ``config`` (default <workdir>/config.json)."""
    return main_spec(translate.spec(load_config(workdir, config)), workdir, epochs, show)


def main(argv):
    del argv
    require('workdir')
    f = flags.FLAGS
    main_run(f.config, f.workdir, f.epochs, f.show)


if __name__ == '__main__':
    define_flags()
    run_main(main)
