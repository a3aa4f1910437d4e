"""A round's row and the evaluations and samples written with it, for one run.

    row = round_row(t, metrics, t - 1, state)   {'round': t, <metric>: float or list, ...}

Every entry point that writes rows (experiments.trainer, the Flower ServerApp) builds them here,
so a row has the same keys however the round was computed.
"""
import os

import numpy as np

from experiments import writers
from experiments.console import log
from fedgen import tasks
from fedgen.data import partition
from fedgen.fl import algorithm as base
from fedgen.io import checkpoint
from fedgen.metrics import plots


def fmt(metrics: dict) -> str:
    """'k v' pairs of the numeric metrics (PTB's include the perplexity's window and stride)."""
    return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                     for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def describe_clients(task: tasks.Task, workdir: str) -> None:
    """Prints per-client label histograms (tasks with classes) and saves them as a plot."""
    if task.classes is None:
        return
    hist = partition.label_histogram(task.labels, task.client_train, len(task.classes))
    log('client label histograms (first 10 clients; columns = classes):')
    for k, row in enumerate(hist[:10]):
        log(f'  client {k:3d}  n={row.sum():5d}  ' + ' '.join(f'{v:4d}' for v in row))
    plots.label_histograms(hist, task.classes, os.path.join(workdir, 'label_histograms.png'))


def write_samples(task: tasks.Task, out, writer: writers.RunWriter, step: int, tag: str) -> None:
    """Image samples -> workdir/samples_<tag>.png and TensorBoard; text -> console and TB."""
    if task.sample_kind == 'images':
        log(f'samples: {writer.images(np.asarray(out), step, f"samples_{tag}")}')
    else:
        writer.texts(list(out), step)
        log(f'samples from the global model ({tag}):\n' + '\n'.join(f'  > {t}' for t in out))


def eval_variables(alg, host, frozen) -> tuple[dict, dict | None]:
    """The global model's variables and, with fed.ema_decay > 0, the EMA model's (else None)."""
    frz = alg.effective_frozen(host, frozen)
    ema = base.ema_of(host)
    return {**frz, **host.trainable}, (None if ema is None else {**frz, **ema})


def evaluate_both(evaluate, variables: dict, ema_variables: dict | None) -> dict:
    """evaluate(variables), plus evaluate(ema_variables) with keys suffixed '_ema' when given."""
    out = evaluate(variables)
    if ema_variables is not None:
        out.update({f'{k}_ema': v for k, v in evaluate(ema_variables).items()})
    return out


def round_row(rnd: int, metrics: dict, last_saved: int, state_host) -> dict:
    """The row of round ``rnd`` (1-based) from its fetched metrics; raises a one-line ValueError
    (nothing of the round is saved) when the global state is not finite. A round that used no
    client is a valid round (the model is kept, or under DP moved by noise only)."""
    bad = [int(i) for i in np.ravel(metrics.pop('nonfinite_ids', [])) if i >= 0]
    if bad:
        log(f'warning: round {rnd}: clients {bad} sent non-finite updates (weight 0)')
    keep = f'not saved; the latest checkpoint stays round {last_saved}'
    if not checkpoint.is_finite(state_host):
        raise ValueError(f'round {rnd}: the global state holds NaN or inf (diverged; lower '
                         f'fed.client_lr or fed.server_lr); {keep}')
    row = {'round': rnd}
    for k, v in metrics.items():
        v = np.asarray(v)
        row[k] = float(v) if v.size == 1 else v.tolist()
    if bad:
        row['nonfinite_ids'] = bad
    return row
