"""The one entry point: pre-train (or load) the backbone, then federate over the client population.

    python -m experiments.train --config configs/ptb_fedgen_edge.py --workdir runs/ptb
    python -m experiments.train --config configs/ptb_fedgen_edge.py:tiny --workdir runs/t \
        --config.fed.rounds=5

Writes into the workdir: backbone/<recipe-hash>/ (cached pre-trained backbone), checkpoints/
(Orbax, step = rounds done, automatic resume), metrics.jsonl (one row per round), summary.json.
A bad config value, missing data or an unreadable checkpoint prints one line, ``error: ...``, and
exits with status 2 before any compute.
"""
import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from experiments import backbones, settings
from experiments.console import guarded, log
from fedgen import algorithms, checkpoint, client, comm, plots, population, tasks
from fedgen.data import batching, images

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, cache and logs.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host; reads the '
    'coordinator settings from the environment).')


def fmt(metrics: dict) -> str:
    return '  '.join(f'{k} {v:.4g}' for k, v in metrics.items())


def describe_clients(task: tasks.Task, workdir: str) -> None:
    """Prints per-client label histograms (tasks with classes) and saves them as a plot."""
    if task.classes is None:
        return
    hist = images.label_histogram(task.labels, task.client_train, len(task.classes))
    log('client label histograms (first 10 clients; columns = classes):')
    for k, row in enumerate(hist[:10]):
        log(f'  client {k:3d}  n={row.sum():5d}  ' + ' '.join(f'{v:4d}' for v in row))
    plots.label_histograms(hist, task.classes, os.path.join(workdir, 'label_histograms.png'))


def write_samples(task: tasks.Task, out, workdir: str, tag: str) -> None:
    """Image samples -> workdir/samples_<tag>.png; text samples -> printed."""
    if task.sample_kind == 'images':
        path = os.path.join(workdir, f'samples_{tag}.png')
        plots.image_grid(out, path)
        log(f'samples: {path}')
    else:
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
    mesh = settings.mesh(config)
    local = -(-fed.clients_per_round // (mesh.size if mesh is not None else 1))
    chunk = population.chunk_for_budget(per, int(fed.client_mem_budget_mb * 2**20), local)
    log(f'client chunk {chunk} from a {fed.client_mem_budget_mb} MB budget '
        f'({per / 2**20:.1f} MB per client)')
    return chunk


def read_rows(path: str, upto: int) -> list[dict]:
    """metrics.jsonl rows with round <= upto (rows past the restored round are dropped)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r['round'] <= upto]


def write_rows(path: str, rows: list[dict]) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    os.replace(tmp, path)


def setup(config, workdir: str) -> dict:
    """Everything a run (or a later personalization of it) needs, from the config, before any
    round: the task, the frozen and trainable trees, the algorithm and its initial state."""
    task = tasks.get(config.task).prepare(config)
    p = settings.preflight(config, task)
    rng = jax.random.PRNGKey(config.seed)
    params, bb_info = backbones.pretrained(config, task, workdir, rng)
    frozen, trainable = algorithms.variables(p, params, jax.random.fold_in(rng, 1))
    fed = config.fed
    steps = batching.num_local_steps([len(i) for i in task.client_train], fed.batch_size,
                                     fed.local_epochs, fed.max_steps_per_epoch)
    chunk = budget_chunk(config, task, p, frozen, trainable, steps)
    p = settings.method_params(config, chunk)
    mesh = settings.mesh(config)
    alg = algorithms.make(p, task.loss_fn, mesh)
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


def run(config, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the job; ``stop_after`` ends the process early after that many rounds
    (as a kill between rounds would). Returns the summary dict."""
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    r = setup(config, workdir)
    task, alg, state, frozen, mesh, rng = (r['task'], r['alg'], r['state'], r['frozen'], r['mesh'],
                                           r['rng'])
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=1))
    log(f'data: {json.dumps(task.info)}')
    describe_clients(task, workdir)
    aux = backbones.auxiliaries(config, task, workdir)
    evaluate = task.evaluator('valid', aux)
    bb_metrics = evaluate({'params': r['params']})
    log(f'backbone: {fmt(bb_metrics)}  ({r["bb_info"]})')

    fed, steps = config.fed, r['steps']
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    start = checkpoint.latest(mngr) or 0
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    if start:
        state = checkpoint.restore(mngr, start, state=state)['state']
        log(f'resumed from round {start}')
    rows = read_rows(metrics_path, start)
    write_rows(metrics_path, rows)
    if mesh is not None:  # replicated once, so every round sees the same placement
        state, frozen = population.replicate(state, mesh), population.replicate(frozen, mesh)
    cost = comm.round_cost(alg, state.trainable, fed.clients_per_round)
    full = comm.num_bytes(r['params'])
    adapters = comm.num_bytes(
        algorithms.variables(r['method'], r['params'], jax.random.PRNGKey(0))[1])
    log(f'per client per round: up {cost.up_per_client:,} B, down {cost.down_per_client:,} B '
        f'({fed.algorithm}); LoRA adapters {adapters:,} B = {100 * adapters / full:.3f}% of the '
        f'full model {full:,} B; local steps S={steps}')
    apply = jax.jit(alg.apply, donate_argnums=0)
    totals = {
        'up_bytes': rows[-1]['up_bytes_total'] if rows else 0,
        'down_bytes': rows[-1]['down_bytes_total'] if rows else 0
    }
    end = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
    bar = tqdm(range(start, end),
               desc='rounds',
               unit='round',
               file=sys.stdout,
               initial=start,
               total=fed.rounds)
    sample_key = jax.random.fold_in(rng, 3)
    for rnd in bar:
        t0 = time.time()
        ids = batching.sample_clients(config.seed, rnd, fed.num_clients, fed.clients_per_round)
        data = batching.pack_clients(task.pool, task.client_train, ids, config.seed, rnd,
                                     fed.batch_size, fed.local_epochs, steps,
                                     fed.max_steps_per_epoch)
        if mesh is not None:
            data = batching.pad_clients(data, mesh.size)
            data = population.shard_clients(data, mesh)
        state, m = apply(state, frozen, data)
        checkpoint.save(mngr, rnd + 1, state=state)
        totals = comm.accumulate(totals, cost)
        row = {
            'round': rnd + 1,
            **{
                k: float(v)
                for k, v in m.items()
            }, 'up_bytes_round': cost.up_round,
            'down_bytes_round': cost.down_round,
            'up_bytes_total': totals['up_bytes'],
            'down_bytes_total': totals['down_bytes']
        }
        if (rnd + 1) % config.eval.every == 0 or rnd + 1 == fed.rounds:
            variables = {**frozen, **state.trainable}
            row.update(evaluate(variables))
            if config.eval.samples_every_eval:
                write_samples(task, task.sample(variables, sample_key), workdir,
                              f'round{rnd + 1:04d}')
        row['round_s'] = round(time.time() - t0, 3)
        rows.append(row)
        write_rows(metrics_path, rows)
        last = [r[task.metric] for r in rows if task.metric in r]
        bar.set_postfix({
            'loss': f'{row["train_loss"]:.3f}',
            task.metric: f'{last[-1]:.2f}' if last else '-',
            'up_MB': f'{totals["up_bytes"] / 1e6:.2f}'
        })
    bar.close()
    checkpoint.wait(mngr)
    if end < fed.rounds:
        return {'stopped_after': end}

    variables = {**frozen, **state.trainable}
    # The last round was always evaluated; reuse it rather than evaluating again.
    final = {k: v for k, v in rows[-1].items() if k in bb_metrics} if rows else {}
    if len(final) != len(bb_metrics):
        final = evaluate(variables)
    if task.test is not None:
        final.update(task.evaluator('test', aux)(variables))
    summary = {
        'algorithm': fed.algorithm,
        'rounds': fed.rounds,
        **{
            f'backbone_{k}': v
            for k, v in bb_metrics.items()
        },
        **{
            f'final_{k}': v
            for k, v in final.items()
        }, 'up_bytes_per_client_round': cost.up_per_client,
        'down_bytes_per_client_round': cost.down_per_client,
        'up_bytes_per_round': cost.up_round,
        'up_bytes_total': totals['up_bytes'],
        'down_bytes_total': totals['down_bytes'],
        'lora_share_of_full_uplink': adapters / full,
        'local_steps': steps,
        'client_chunk': r['method'].chunk,
        'wall_s': round(time.time() - t_start, 1)
    }
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    log('\n' + '\n'.join(f'{k:>28s}  {v:,.4g}' if isinstance(v, float) else f'{k:>28s}  {v}'
                         for k, v in summary.items()))
    write_samples(task, task.sample(variables, sample_key), workdir, 'final')
    return summary


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError('--config and --workdir are required')
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    app.run(guarded(main))
