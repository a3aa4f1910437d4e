"""The one entry point: pre-train (or load) the backbone, then federate over the client population.

    python -m experiments.train --config configs/ptb_fedgen_edge.py --workdir runs/ptb
    python -m experiments.train --config configs/ptb_fedgen_edge.py:tiny --workdir runs/t \
        --config.fed.rounds=5

Writes into the workdir: backbone/<recipe-hash>/ (cached pre-trained backbone), checkpoints/
(Orbax, step = rounds done, automatic resume), config.json, metrics.jsonl (one row per round),
TensorBoard event files, summary.json (see experiments/writers.py).

The run is experiments.trainer's loop at R = 1 (prepare.setup, then trainer.train with one
member): one round t (1-based) samples and packs the round's clients (each process packs only its
rows of the client axis) -> one jitted apply -> the host copy of the new state -> stop if it is not
finite -> the row (evaluation every eval.every rounds) -> metrics.jsonl and events -> the
checkpoint of step t. A round that used no client is a valid round (the model kept; under DP a
noise-only, accounted update). The row is written before its checkpoint, so a kill at any moment
resumes into exactly the rows and byte totals of an unbroken run (writers.py). Rerunning a
finished run (summary.json present, the same config) prints its summary and changes nothing.

Errors: a bad config value, missing data, an unreadable checkpoint, a workdir holding another
config's run (unless checkpoint.overwrite), a pairing of settings that cannot run together or a
non-finite global state print one line, ``error: ...``, and exit with status 2; a failing round is
never saved.

Multi-host (``--distributed``): every process runs this same program; the client axis is sharded
over all processes' devices, process 0 alone writes files (Orbax writes the checkpoints, a
collective save), and every process computes the same rows.
"""
import time

import jax
from absl import flags
import ml_collections
from ml_collections import config_flags

from experiments import prepare, trainer, translate, writers
from experiments.console import log, require, run_main
from experiments.prepare import budget_chunk, check_workdir, round_data, setup
from experiments.runspec import RunSpec
from experiments.rows import eval_variables, evaluate_both, fmt, round_row, write_samples
from fedgen.fl import mesh as population

# Re-exported: the Flower apps, experiments and tests build runs and rows through train.
__all__ = [
    'budget_chunk', 'check_workdir', 'eval_variables', 'evaluate_both', 'fmt', 'round_data',
    'round_row', 'run', 'setup', 'write_samples'
]


def log_summary(summary: dict) -> None:
    """The summary as one right-aligned 'key  value' line per entry."""
    log('\n' + '\n'.join(f'{k:>28s}  {v:,.4g}' if isinstance(v, float) else f'{k:>28s}  {v}'
                         for k, v in summary.items()))


def run(config: ml_collections.ConfigDict | RunSpec,
        workdir: str,
        stop_after: int | None = None) -> dict:
    """Runs (or resumes) the job: trainer.train with this one run (R = 1). ``config``: the
    ConfigDict (translated here, once) or its RunSpec (an entry point that translated it already,
    e.g. to personalize the run after). ``stop_after`` ends
    the process early after that many rounds (as a kill between rounds would) and returns
    {'stopped_after': n}; else the summary dict (JSON-safe). A run that already finished with
    exactly this config returns its summary.json at once (nothing read, computed or written); a
    run that fails before writing anything leaves no directory it created behind."""
    t_start = time.time()
    primary = population.is_primary()
    spec = config if isinstance(config, RunSpec) else translate.spec(config)  # checks, no data
    done = writers.finished(spec.record, workdir)
    if done is not None:
        log(f'{workdir} holds this run, finished; its summary (nothing recomputed):')
        log_summary(done)
        return done
    with writers.workdir_made(workdir, primary):
        population.barrier('workdir')
        prepare.check_workdir(spec, workdir)
        r = prepare.setup(spec, workdir)
        member = trainer.Member(spec, r, workdir, workdir)
        (summary, ), _ = trainer.train([member],
                                       mesh=r['mesh'],
                                       stop_after=stop_after,
                                       t_start=t_start)
    if 'error' in summary:
        raise ValueError(summary['error'])
    if 'stopped_after' not in summary:
        log_summary(summary)
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program (modules importing
    experiments.train for its functions define their own)."""
    config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, cache and logs.')
    flags.DEFINE_bool(
        'distributed', False, 'Call jax.distributed.initialize() first (multi-host). Settings '
        'it is not given come from the cluster environment (SLURM, Open MPI, Cloud TPU, ...).')
    flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (--distributed).')
    flags.DEFINE_integer('num_processes', None, 'Processes (--distributed).')
    flags.DEFINE_integer('process_id', None, 'This process, 0-based (--distributed).')


def main(argv):
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    require('config', 'workdir')
    run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    define_flags()
    run_main(main)
