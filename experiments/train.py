"""The one entry point: pre-train (or load) the backbone, then federate over the client population.

    python -m experiments.train --config configs/ptb_fedgen_edge.py --workdir runs/ptb
    python -m experiments.train --config configs/ptb_fedgen_edge.py:tiny --workdir runs/t \
        --config.fed.rounds=5

Writes into the workdir: backbone/<recipe-hash>/ (cached pre-trained backbone), checkpoints/
(Orbax, step = rounds done, automatic resume), config.json, metrics.jsonl (one row per round),
TensorBoard event files, summary.json (see experiments/writers.py).

One round t (1-based): sample and pack the round's clients (each process packs only its rows of
the client axis) -> one jitted apply -> the host copy of the new state -> stop if it is not finite
-> the row (evaluation every eval.every rounds) -> metrics.jsonl and events -> the checkpoint of
step t. A round that used no client is a valid round (the model kept; under DP a noise-only,
accounted update). The row is written before its checkpoint, so a kill at any moment
resumes into exactly the rows and byte totals of an unbroken run (writers.py).

Errors: a bad config value, missing data, an unreadable checkpoint, a workdir holding another
config's run (unless checkpoint.overwrite), a pairing of settings that cannot run together or a
non-finite global state print one line, ``error: ...``, and exit with status 2; a failing round is
never saved.

Multi-host (``--distributed``): every process runs this same program; the client axis is sharded
over all processes' devices, process 0 alone writes files (Orbax writes the checkpoints, a
collective save), and every process computes the same rows.
"""
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from experiments import backbones, writers
from experiments import translate
from experiments.console import guarded, log
from fedgen import algorithms, tasks
from fedgen.fl import algorithm as base
from fedgen.io import checkpoint
from fedgen.fl import local_update as client
from fedgen.fl import comm
from fedgen.lora import peft
from fedgen.metrics import plots
from fedgen.fl import mesh as population
from fedgen.data import batching, images


def fmt(metrics: dict) -> str:
    """'k v' pairs of the numeric metrics (PTB's include the perplexity's window and stride)."""
    return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                     for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def describe_clients(task: tasks.Task, workdir: str) -> None:
    """Prints per-client label histograms (tasks with classes) and saves them as a plot."""
    if task.classes is None:
        return
    hist = images.label_histogram(task.labels, task.client_train, len(task.classes))
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


def budget_chunk(config, task: tasks.Task, p: algorithms.MethodParams, frozen, trainable,
                 steps: int) -> int:
    """fed.client_chunk, or, when fed.client_mem_budget_mb > 0, the chunk that fits the budget:
    floor(budget / bytes of one client), from XLA's memory analysis of one client's update."""
    fed = config.fed
    if not fed.client_mem_budget_mb:
        return fed.client_chunk
    one = batching.pack_clients(task.pool, task.client_train, [0], config.seed, 0, fed.batch_size,
                                fed.local_epochs, steps, fed.max_steps_per_epoch)
    per_client = {
        'data': {
            'batches': one.batches,
            'mask': one.mask
        },
        'rng': jax.random.split(jax.random.PRNGKey(0), 1)
    }
    update = client.make_local_update(task.loss_fn, p.client_tx)
    per = population.client_bytes(lambda s, x: update(s[0], s[1], x['data'], x['rng']).delta,
                                  (frozen, trainable), per_client)
    mesh = translate.mesh(config)
    local = -(-fed.clients_per_round // (mesh.size if mesh is not None else 1))
    chunk = population.chunk_for_budget(per, int(fed.client_mem_budget_mb * 2**20), local)
    log(f'client chunk {chunk} from a {fed.client_mem_budget_mb} MB budget '
        f'({per / 2**20:.1f} MB per client)')
    return chunk


def check_workdir(config, workdir: str) -> None:
    """Refuses a workdir whose config.json is another run's (a field outside writers.RUN_FREE
    differs) with one line showing the difference; checkpoint.overwrite=True clears that run's
    outputs instead (the recipe-keyed caches stay)."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = writers.config_conflict(old, json.loads(config.to_json_best_effort()))
    population.barrier('check_workdir')  # every process has read config.json before any write
    if not diff:
        return
    if not config.checkpoint.overwrite:
        raise ValueError(f'workdir {workdir} holds a run of another config ({"; ".join(diff)}); '
                         'use another --workdir or --config.checkpoint.overwrite=True')
    if population.is_primary():
        gone = writers.clear_run(workdir)
        log(f'checkpoint.overwrite: removed the run of another config ({"; ".join(diff)}): '
            f'{", ".join(gone)}')
    population.barrier('clear_run')


def setup(config, workdir: str) -> dict:
    """Everything a run (or a later personalization of it) needs, from the config, before any
    round: the task, the frozen and trainable trees, the algorithm and its initial state."""
    translate.check_run(config)  # every fed/lora field and their pairings, before any data
    init_from = config.lora.get('init_from', '')
    if init_from and not os.path.isfile(os.path.join(init_from, 'adapter_config.json')):
        raise ValueError(f'lora.init_from: {init_from} holds no adapter_config.json (expected a '
                         'PEFT LoRA directory, e.g. one written by experiments.export)')
    task = translate.prepare_task(config)
    p = translate.preflight(config, task)
    rng = jax.random.PRNGKey(config.seed)
    params, bb_info = backbones.pretrained(config, task, workdir, rng)
    frozen, trainable = algorithms.variables(p, params, jax.random.fold_in(rng, 1))
    if init_from and not p.full_model:
        arch = task.info.get('model', {}).get('arch')
        if arch is None:
            raise ValueError(f'lora.init_from is implemented for text tasks, not {task.name!r}')
        trainable = {
            'lora': peft.initial_adapters(init_from, arch, p.lora.alpha, trainable['lora'])
        }
    fed = config.fed
    steps = batching.num_local_steps([len(i) for i in task.client_train], fed.batch_size,
                                     fed.local_epochs, fed.max_steps_per_epoch)
    chunk = budget_chunk(config, task, p, frozen, trainable, steps)
    mesh = translate.mesh(config)
    p, alg = translate.make_algorithm(config, task, chunk, mesh)
    state = alg.init(trainable, jax.random.fold_in(rng, 2))
    return dict(task=task,
                params=params,
                bb_info=bb_info,
                frozen=frozen,
                method=p,
                alg=alg,
                state=state,
                steps=steps,
                mesh=mesh,
                rng=rng)


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


def round_data(config, task: tasks.Task, steps: int, rnd: int, mesh, rows: tuple[int, int],
               width: int) -> batching.RoundData:
    """Round ``rnd``'s RoundData, [width, ...] on the client axis (padding clients n_k = 0):
    this process packs only its rows [lo, hi) and, with a mesh, the global arrays are
    assembled from every process's rows."""
    fed = config.fed
    ids, present = translate.sample_round(config, rnd)
    lo, hi = rows
    mine = ids[lo:hi]
    pack = lambda i: batching.pack_clients(task.pool, task.client_train, i, config.seed, rnd, fed.
                                           batch_size, fed.local_epochs, steps, fed.
                                           max_steps_per_epoch)
    data = pack(mine) if len(mine) else jax.tree.map(np.zeros_like, pack(ids[:1]))
    if present is not None:  # Poisson sampling: the slots beyond the draw carry nothing
        data = batching.drop_absent(data, present[lo:hi] if len(mine) else present[:1] * 0)
    data = batching.pad_clients(data, hi - lo)  # -> exactly hi - lo rows
    if mesh is None:
        return data
    put = lambda x: population.shard_clients(x, mesh, width)
    return data.replace(client_ids=put(data.client_ids),
                        batches=put(data.batches),
                        mask=put(data.mask),
                        n_k=put(data.n_k))


def host_sampled(data: batching.RoundData) -> np.ndarray:
    """[C] 1 where the slot holds a sampled client (n_k > 0), gathered to the host."""
    return np.asarray(population.to_host(data.n_k)) > 0


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


def run(config, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the job; ``stop_after`` ends the process early after that many rounds
    (as a kill between rounds would). Returns the summary dict (JSON-safe)."""
    t_start = time.time()
    primary = population.is_primary()
    if primary:
        os.makedirs(workdir, exist_ok=True)
    population.barrier('workdir')
    check_workdir(config, workdir)
    r = setup(config, workdir)
    task, alg, state, frozen, mesh, rng = (r['task'], r['alg'], r['state'], r['frozen'], r['mesh'],
                                           r['rng'])
    fed, steps = config.fed, r['steps']
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    start, items, warnings = checkpoint.restore_latest(mngr, state=jax.device_get(state))
    for w in warnings:
        log(f'warning: {w}')
    start = start or 0
    if start:
        state = items['state']
        log(f'resumed from round {start}')
    writer = writers.RunWriter(workdir, start, primary)
    if [row['round'] for row in writer.rows] != list(range(1, start + 1)):
        log(f'warning: metrics.jsonl does not hold one row for each of rounds 1..{start}; '
            'its byte totals count only the rounds it holds')
    writer.config(config.to_json_best_effort(indent=1))
    log(f'data: {json.dumps(task.info)}')
    if primary:
        describe_clients(task, workdir)
    aux = backbones.auxiliaries(config, task, workdir)
    evaluate = task.evaluator('valid', aux)
    bb_metrics = evaluate({'params': r['params']})
    log(f'backbone: {fmt(bb_metrics)}  ({r["bb_info"]})')

    # Devices: the state and frozen tree replicated once; the evaluator runs on host copies.
    # Without a mesh both are committed to one device: a round's output state is committed, so
    # an uncommitted first input would compile the round a second time in round 2.
    device = jax.local_devices()[0]
    placed = ((population.replicate(state, mesh),
               population.replicate(frozen, mesh)) if mesh is not None else
              (jax.device_put(state, device), jax.device_put(frozen, device)))
    state, frozen_dev = placed
    per_round = translate.dp_capacity(config)  # C, ceil(C (1 + over_select)), or the DP capacity
    width = per_round + (-per_round) % (mesh.size if mesh else 1)
    rows = population.process_rows(mesh, width)
    log(f'client axis: {width} rows over {mesh.size if mesh else 1} device(s) in '
        f'{jax.process_count()} process(es); this process packs rows {rows[0]}..{rows[1] - 1}')
    cost = comm.round_cost(alg, r['state'].trainable, fed.clients_per_round)
    full = comm.num_bytes(r['params'])
    # The LoRA adapters this config's lora.* would train (also for full-model methods: the
    # uplink comparison is against them).
    as_lora = dataclasses.replace(r['method'], name='fedgen_edge', prox_target='lora')
    adapters = comm.num_bytes(
        jax.eval_shape(lambda p: algorithms.variables(as_lora, p, jax.random.PRNGKey(0))[1],
                       r['params']))
    log(f'per client per round: up {cost.up_per_client:,} B, down {cost.down_per_client:,} B '
        f'({fed.algorithm}); LoRA adapters {adapters:,} B = {100 * adapters / full:.3f}% of the '
        f'full model {full:,} B; local steps S={steps}')
    up_client, down_client = translate.client_bytes(config, alg, r['state'].trainable)
    acct = translate.accountant(config)
    for note in translate.privacy_notes(config):
        log(note)
    apply = jax.jit(alg.apply, donate_argnums=0)
    last = writer.rows[-1] if writer.rows else {}
    totals = {
        'up_bytes': last.get('up_bytes_total', 0),
        'down_bytes': last.get('down_bytes_total', 0)
    }
    end = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
    bar = tqdm(range(start, end),
               desc='rounds',
               unit='round',
               file=sys.stdout,
               initial=start,
               total=fed.rounds,
               disable=not primary)
    sample_key = jax.random.fold_in(rng, 3)
    host = population.to_host(state)
    try:
        for rnd in bar:
            t0 = time.time()
            data = round_data(config, task, steps, rnd, mesh, rows, width)
            state, m = apply(state, frozen_dev, data)
            host, m, ids = population.to_host((state, m, data.client_ids))
            live = m.pop('live')
            row = round_row(rnd + 1, m, rnd, host)
            up, down = comm.round_bytes(up_client, down_client, ids, host_sampled(data), live)
            totals = {
                'up_bytes': totals['up_bytes'] + up,
                'down_bytes': totals['down_bytes'] + down
            }
            if acct is not None:
                row['dp_epsilon'] = acct.epsilon_after(rnd + 1)
            row.update({
                'up_bytes_round': up,
                'down_bytes_round': down,
                'up_bytes_total': totals['up_bytes'],
                'down_bytes_total': totals['down_bytes']
            })
            if (rnd + 1) % config.eval.every == 0 or rnd + 1 == fed.rounds:
                variables, ema_vars = eval_variables(alg, host, frozen)
                row.update(evaluate_both(evaluate, variables, ema_vars))
                if config.eval.samples_every_eval and primary:  # from the EMA model, if any
                    write_samples(task, task.sample(ema_vars or variables, sample_key), writer,
                                  rnd + 1, f'round{rnd + 1:04d}')
            row['round_s'] = round(time.time() - t0, 3)
            row = writer.row(row)  # before the checkpoint: see the module docstring
            checkpoint.save(mngr, rnd + 1, state=host)
            seen = [x for x in writer.rows if x.get(task.metric) is not None]
            win = task.metric.rsplit('_', 1)[0]  # 'valid': its _window / _stride, when it has them
            proto = (f' W{seen[-1][win + "_window"]}/S{seen[-1][win + "_stride"]}'
                     if seen and win + '_window' in seen[-1] else '')
            bar.set_postfix({
                'loss':  # absent under DP: a statistic of raw client updates
                f'{row["train_loss"]:.3f}' if row.get('train_loss') is not None else '-',
                task.metric:
                f'{seen[-1][task.metric]:.2f}{proto}' if seen else '-',
                'up_MB':
                f'{totals["up_bytes"] / 1e6:.2f}',
                **({
                    'eps': f'{acct.epsilon_after(rnd + 1):.3g}'  # the row holds null for inf
                } if acct is not None else {})
            })
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
        checkpoint.wait(mngr)  # the last good step is committed even when a round failed
    if end < fed.rounds:
        writer.close()
        return {'stopped_after': end}

    variables, ema_vars = eval_variables(alg, host, frozen)
    # The last round was always evaluated; reuse it rather than evaluating again.
    final = {
        k: v
        for k, v in writer.rows[-1].items() if k.removesuffix('_ema') in bb_metrics
    } if writer.rows else {}
    if len(final) != len(bb_metrics) * (1 if ema_vars is None else 2):
        final = evaluate_both(evaluate, variables, ema_vars)
    if task.test is not None:
        evaluate_test = task.evaluator('test', aux)
        final.update(evaluate_both(evaluate_test, variables, ema_vars))
        if config.eval.get('zero_shot_test', False):  # the frozen backbone on test, too
            bb_metrics = {**bb_metrics, **evaluate_test({'params': r['params']})}
    summary = writer.summary({
        'algorithm':
        fed.algorithm,
        'rounds':
        fed.rounds,
        **{
            f'backbone_{k}': v
            for k, v in bb_metrics.items()
        },
        **{
            f'final_{k}': v
            for k, v in final.items()
        }, 'up_bytes_per_client_round':
        cost.up_per_client,
        'down_bytes_per_client_round':
        cost.down_per_client,
        'up_bytes_per_round':
        cost.up_round,
        'up_bytes_total':
        totals['up_bytes'],
        'down_bytes_total':
        totals['down_bytes'],
        'lora_share_of_full_uplink':
        adapters / full,
        'local_steps':
        steps,
        'client_chunk':
        r['method'].chunk,
        **({
            'dp_epsilon': writer.rows[-1].get('dp_epsilon'),
            'dp_delta': translate.dp_delta(config)
        } if acct is not None else {}), 'wall_s':
        round(time.time() - t_start, 1)
    })
    log('\n' + '\n'.join(f'{k:>28s}  {v:,.4g}' if isinstance(v, float) else f'{k:>28s}  {v}'
                         for k, v in summary.items()))
    if primary:
        write_samples(task, task.sample(ema_vars or variables, sample_key), writer, fed.rounds,
                      'final')
    writer.close()
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
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError('--config and --workdir are required')
    run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
    define_flags()
    app.run(guarded(main))
