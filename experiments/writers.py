"""What a run writes into its workdir: config, per-round rows, TensorBoard events and summary.

    <workdir>/config.json              the run's config (ml_collections JSON)
    <workdir>/metrics.jsonl            one JSON row per round, {'round': t, <metric>: value, ...}
    <workdir>/events.out.tfevents.*    TensorBoard (tensorboardX): the config as text (step 0),
                                       every numeric row value as a scalar at step = round, and
                                       samples (an image grid or text) at the round they were drawn
    <workdir>/summary.json             the finished run

Only one process writes (``primary``: process 0 of a multi-process run); every process keeps the
same rows in memory, so byte totals and the summary agree everywhere.

JSON is strict: a NaN or inf value is written as ``null`` and its key is listed in the row's
``nonfinite`` field (TensorBoard gets the raw value).

Kill safety. The loop writes round t's row (metrics.jsonl, replaced atomically, and the flushed
events) *before* it saves round t's checkpoint. So at any kill the rows cover at least every
committed checkpoint step. A resume from step s keeps the rows of rounds <= s, rewrites the file
without the later ones (they are recomputed, identically), and opens the event writer with
``purge_step = s + 1``, which makes TensorBoard hide the earlier session's events from round s + 1
on. Hence metrics.jsonl holds exactly one row per round, equal to an unbroken run's.

A run's directory: ``finished`` reads back the summary of a run done with exactly the same config
(a rerun changes nothing), and ``workdir_made`` removes the directories a run created when it
fails before writing into them.
"""
import contextlib
import glob
import json
import math
import os
import shutil
import time

import ml_collections
import numpy as np

from fedgen.metrics import plots
from fedgen.tasks import ptb as ptb_task

# Config fields that may change between the sessions of one run: they do not change the rounds'
# results (schedule length, chunking, devices, evaluation, checkpointing, where the data is read).
RUN_FREE = ('fed.rounds', 'fed.client_chunk', 'fed.client_mem_budget_mb', 'fed.num_devices', 'eval',
            'checkpoint', 'personalize', 'metrics', 'data.source', 'data.verify_md5')
# Config fields that only stages after training read (experiments.personalize and what builds on
# it): a finished run is reused whatever they say; those stages key their own outputs on them.
POST_RUN = ('personalize', )
# Config fields added after runs were recorded, with the value that computes what their absence
# did: a run recorded without one equals a config that sets it to that value.
ADDED_FIELDS = {f'model.{k}': v for k, v in ptb_task.ADDED_MODEL_FIELDS.items()}
# What clear_run removes: everything a run writes except the recipe-keyed caches (backbone/ etc.).
RUN_OUTPUTS = ('checkpoints', 'personal', 'config.json', 'metrics.jsonl', 'summary.json',
               'events.out.tfevents.*', 'samples_*.png', 'label_histograms.png')


def json_safe(row: dict) -> dict:
    """A copy of ``row`` with non-finite floats as None, listed under 'nonfinite' (if any)."""
    out, bad = {}, []
    for k, v in row.items():
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            out[k] = None
            bad.append(k)
        else:
            out[k] = v
    if bad:
        out['nonfinite'] = sorted(set(bad) | set(row.get('nonfinite') or ()))
    return out


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def read_rows(path: str, upto: int) -> list[dict]:
    """The rows of ``path`` with round <= ``upto`` (none when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r['round'] <= upto]


def _flat(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(_flat(v, key + '.'))
        else:
            out[key] = v
    return out


def config_conflict(old: dict, new: dict, free: tuple[str, ...] = RUN_FREE) -> list[str]:
    """'field: old -> new' for every field (dotted path) outside ``free`` that differs between
    two configs as JSON dicts; a field present in one only shows as missing, unless it is one of
    ADDED_FIELDS at the value that behaves as its absence did."""
    a, b = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + '.') for f in free):
            continue
        if key in ADDED_FIELDS and {a.get(key, ADDED_FIELDS[key]),
                                    b.get(key, ADDED_FIELDS[key])} == {ADDED_FIELDS[key]}:
            continue
        if a.get(key, '<missing>') != b.get(key, '<missing>'):
            lines.append(f'{key}: {a.get(key, "<missing>")!r} -> {b.get(key, "<missing>")!r}')
    return lines


def clear_run(workdir: str) -> list[str]:
    """Removes a run's outputs (RUN_OUTPUTS) from ``workdir``; returns what was removed."""
    gone = []
    for pattern in RUN_OUTPUTS:
        for path in sorted(glob.glob(os.path.join(workdir, pattern))):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            gone.append(os.path.basename(path))
    return gone


def run_config(workdir: str, field: str = '--workdir') -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with (its config.json, every field), read the
    same way by export, personalize and the report; ValueError naming ``field`` if there is none."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isdir(workdir):
        raise ValueError(f'{field}: no such directory {workdir}')
    if not os.path.isfile(path):
        raise ValueError(f'{field}: {workdir} holds no config.json (not a run directory of '
                         'experiments.train)')
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def finished(config_json: str, workdir: str) -> dict | None:
    """summary.json of the run that finished in ``workdir`` with this config (every field but the
    POST_RUN ones; RUN_FREE ones included: fed.rounds, eval, ...), else None. A rerun returns it
    unchanged."""
    paths = [os.path.join(workdir, n) for n in ('config.json', 'summary.json')]
    if not all(os.path.isfile(p) for p in paths):
        return None
    with open(paths[0]) as f:
        old = json.load(f)
    if config_conflict(old, json.loads(config_json), free=POST_RUN):
        return None
    with open(paths[1]) as f:
        return json.load(f)


@contextlib.contextmanager
def workdir_made(path: str, primary: bool = True):
    """Creates ``path`` (and missing parents); when the body raises, the directories this call
    created and that are still empty are removed again (nothing else is touched)."""
    made, d = [], os.path.abspath(path)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    if primary:
        os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in made if primary else ():  # deepest first
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


class RunWriter:
    """The writer of one session of a run that resumes after ``resume_step`` rounds.

    ``primary`` False (a process other than 0): rows are kept in memory; nothing is written.
    """

    def __init__(self, workdir: str, resume_step: int, primary: bool):
        self.workdir, self.primary = workdir, primary
        self.metrics_path = os.path.join(workdir, 'metrics.jsonl')
        self.rows = read_rows(self.metrics_path, resume_step)
        self.tb = None
        if primary:
            from tensorboardX import SummaryWriter
            self._write_rows()
            # The file name holds whole seconds only; a second session within the same second
            # would truncate the first one's file, so a nanosecond suffix keeps names unique and
            # in session order.
            self.tb = SummaryWriter(logdir=workdir,
                                    purge_step=resume_step + 1,
                                    flush_secs=30,
                                    filename_suffix=f'.{time.time_ns()}')

    def _write_rows(self) -> None:
        write_atomic(self.metrics_path, ''.join(json.dumps(r) + '\n' for r in self.rows))

    def config(self, record: str) -> None:
        """config.json (the run's config JSON ``record``, indented) and the config as TensorBoard
        text (a code block)."""
        if self.primary:
            config_json = json.dumps(json.loads(record), indent=1)
            write_atomic(os.path.join(self.workdir, 'config.json'), config_json)
            self.tb.add_text('config', '```\n' + config_json + '\n```', 0)
            self.tb.flush()

    def row(self, row: dict) -> dict:
        """Appends one round's row (returned JSON-safe): metrics.jsonl, then every numeric
        value as a scalar at step = row['round'], flushed before returning."""
        safe = json_safe(row)
        self.rows.append(safe)
        if self.primary:
            self._write_rows()
            for k, v in row.items():
                if k != 'round' and isinstance(v, (int, float, np.number)):
                    self.tb.add_scalar(k, float(v), row['round'])
            self.tb.flush()
        return safe

    def images(self, images: np.ndarray, step: int, name: str) -> str | None:
        """uint8 [n, H, W, C] samples: <workdir>/<name>.png and a TensorBoard image grid."""
        if not self.primary:
            return None
        path = os.path.join(self.workdir, f'{name}.png')
        plots.image_grid(images, path)
        self.tb.add_images('samples', np.asarray(images), step, dataformats='NHWC')
        self.tb.flush()
        return path

    def texts(self, texts: list[str], step: int) -> None:
        """Text samples as TensorBoard text (one list item each)."""
        if self.primary:
            self.tb.add_text('samples', '\n'.join(f'- `{t}`' for t in texts), step)
            self.tb.flush()

    def summary(self, summary: dict) -> dict:
        """summary.json (JSON-safe, returned) and its text in TensorBoard."""
        safe = json_safe(summary)
        if self.primary:
            text = json.dumps(safe, indent=1)
            write_atomic(os.path.join(self.workdir, 'summary.json'), text)
            self.tb.add_text('summary', '```\n' + text + '\n```', int(summary.get('rounds', 0)))
            self.tb.flush()
        return safe

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
