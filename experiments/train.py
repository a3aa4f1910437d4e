"""The one entry point: pre-train (or load) the backbone, then federate over the client population.

    python -m experiments.train --config configs/ptb_fedgen_edge.py --workdir runs/ptb
    python -m experiments.train --config configs/ptb_fedgen_edge.py:tiny --workdir runs/t \
        --config.fed.rounds=5

Writes into the workdir: backbone/<recipe-hash>/ (cached pre-trained backbone), checkpoints/
(Orbax, step = rounds done, automatic resume), metrics.jsonl (one row per round), summary.json.
"""
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from experiments import plots
from fedgen import algorithms, checkpoint, client, comm, lora, population, pretrain, tasks
from fedgen.algorithms import optim
from fedgen.data import batching, images

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, cache and logs.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host; reads the '
    'coordinator settings from the environment).')


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


def fmt(metrics: dict) -> str:
    return '  '.join(f'{k} {v:.4g}' for k, v in metrics.items())


def preflight(config, task) -> None:
    """Checks the method, optimizers and LoRA targets/rank on abstract shapes (no compute)."""
    method = algorithms.get(config.fed.algorithm)
    optim.build(config.fed.client_opt, config.fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    optim.build(config.fed.server_opt, config.fed.server_lr, 'fed.server_opt', 'fed.server_lr')
    if not (isinstance(config.fed.rounds, int) and config.fed.rounds >= 0):
        raise ValueError(f'fed.rounds must be an int >= 0, got {config.fed.rounds!r}')
    if not (isinstance(config.eval.every, int) and config.eval.every >= 1):
        raise ValueError(f'eval.every must be an int >= 1, got {config.eval.every!r}')
    abstract = tasks.get(config.task).backbone_shapes(task)
    jax.eval_shape(lambda b, r: method.variables(b, config, r), abstract, jax.random.PRNGKey(0))
    jax.eval_shape(lambda b, r: algorithms.get('fedgen_edge').variables(b, config, r), abstract,
                   jax.random.PRNGKey(0))


def backbone(config, task, task_mod, workdir: str) -> tuple[dict, dict]:
    """Loads config.pretrain.backbone_path, or the workdir cache, or pre-trains and caches."""
    init = task_mod.init_backbone(task, jax.random.PRNGKey(config.seed))
    if config.pretrain.backbone_path:
        params = checkpoint.load_tree(config.pretrain.backbone_path, init, 'pretrain.backbone_path')
        return params, {'source': config.pretrain.backbone_path}
    key = pretrain.recipe_hash(task_mod.recipe(config))
    path = os.path.join(workdir, 'backbone', key)
    if os.path.isdir(path):
        log(f'backbone: cached {path}')
        return checkpoint.load_tree(path, init, 'backbone cache'), {'source': path}
    tx = optim.build(config.pretrain.opt, config.pretrain.lr, 'pretrain.opt', 'pretrain.lr')
    t0, params, loss = time.time(), init, float('nan')
    bar = tqdm(total=config.pretrain.steps, desc='pretrain', unit='step', file=sys.stdout)
    for done, loss, params in pretrain.train(task.loss_fn, tx, init, task.public,
                                             config.pretrain.steps, config.pretrain.batch_size,
                                             config.seed):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f'{loss:.3f}')
    bar.close()
    checkpoint.save_tree(path, params)
    info = {'source': path, 'pretrain_s': round(time.time() - t0, 1), 'pretrain_loss': loss}
    with open(os.path.join(path, 'recipe.json'), 'w') as f:
        json.dump(task_mod.recipe(config), f, indent=1, sort_keys=True)
    return params, info


def cached(workdir: str, name: str, recipe: dict, build) -> dict:
    """A tree built by ``build()`` and cached under workdir/<name>/<recipe hash>."""
    path = os.path.join(workdir, name, pretrain.recipe_hash(recipe))
    if os.path.isdir(path):
        return checkpoint.load_tree(path, None, f'{name} cache')
    t0 = time.time()
    tree = build()
    checkpoint.save_tree(path, tree)
    log(f'{name}: built in {time.time() - t0:.1f}s, cached at {path}')
    return tree


def auxiliaries(config, task, task_mod, workdir: str) -> dict:
    """Evaluation networks the task needs: the fd_classifier CNN (cached by recipe) and, when
    metrics.inception_path is set, Inception-v3 weights for FID."""
    aux = {}
    if hasattr(task_mod, 'train_classifier'):
        root = config.metrics.get('cache_dir') or workdir
        aux['classifier'] = cached(root, 'classifier', task_mod.classifier_recipe(config),
                                   lambda: task_mod.train_classifier(task, config))
    if config.get('metrics') and config.metrics.get('inception_path'):
        from fedgen.metrics import inception
        aux['inception'] = inception.load_params(config.metrics.inception_path)
    return aux


def describe_clients(config, task, workdir: str) -> None:
    """Prints per-client label histograms (image tasks) and saves them as a plot."""
    if not hasattr(task, 'class_names'):
        return
    hist = images.label_histogram(task.labels, task.client_train, len(task.class_names))
    log('client label histograms (first 10 clients; columns = classes):')
    for k, row in enumerate(hist[:10]):
        log(f'  client {k:3d}  n={row.sum():5d}  ' + ' '.join(f'{v:4d}' for v in row))
    plots.label_histograms(hist, task.class_names, os.path.join(workdir, 'label_histograms.png'))


def write_samples(out, workdir: str, tag: str) -> None:
    """Image samples -> workdir/samples_<tag>.png; text samples -> printed."""
    if isinstance(out, np.ndarray):
        path = os.path.join(workdir, f'samples_{tag}.png')
        plots.image_grid(out, path)
        log(f'samples: {path}')
    else:
        log(f'samples from the global model ({tag}):\n' + '\n'.join(f'  > {t}' for t in out))


def with_budget_chunk(config, task, frozen, trainable, steps: int):
    """config, with fed.client_chunk picked from fed.client_mem_budget_mb when that is > 0:
    chunk = floor(budget / bytes of one client), from XLA's memory analysis of one client."""
    fed = config.fed
    if not fed.client_mem_budget_mb:
        return config
    one = batching.pack_clients(task.pool, task.client_train, [0], config.seed, 0, fed.batch_size,
                                fed.local_epochs, steps, fed.max_steps_per_epoch)
    per_client = {
        'data': {
            'batches': one.batches,
            'mask': one.mask
        },
        'rng': jax.random.split(jax.random.PRNGKey(0), 1)
    }
    tx = optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    update = client.make_local_update(task.loss_fn, tx)
    per = population.client_bytes(lambda s, x: update(s[0], s[1], x['data'], x['rng']).delta,
                                  (frozen, trainable), per_client)
    mesh = population.mesh_for(fed.num_devices)
    local = -(-fed.clients_per_round // (mesh.size if mesh is not None else 1))
    chunk = population.chunk_for_budget(per, int(fed.client_mem_budget_mb * 2**20), local)
    log(f'client chunk {chunk} from a {fed.client_mem_budget_mb} MB budget '
        f'({per / 2**20:.1f} MB per client)')
    config = config.copy_and_resolve_references()
    config.fed.client_chunk = chunk
    return config


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


def run(config, workdir: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the job; ``stop_after`` ends the process early after that many rounds
    (as a kill between rounds would). Returns the summary dict."""
    t_start = time.time()
    task_mod = tasks.get(config.task)
    task = task_mod.prepare(config)
    preflight(config, task)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=1))
    log(f'data: {json.dumps(task_mod.describe(task))}')
    describe_clients(config, task, workdir)
    rng = jax.random.PRNGKey(config.seed)
    params, bb_info = backbone(config, task, task_mod, workdir)
    aux = auxiliaries(config, task, task_mod, workdir)
    evaluate = task_mod.evaluator(task, config, 'valid', aux)
    metric = task_mod.METRIC

    bb_metrics = evaluate({'params': params})
    log(f'backbone: {fmt(bb_metrics)}  ({bb_info})')

    method = algorithms.get(config.fed.algorithm)
    frozen, trainable = method.variables(params, config, jax.random.fold_in(rng, 1))
    fed = config.fed
    sizes = [len(i) for i in task.client_train]
    steps = batching.num_local_steps(sizes, fed.batch_size, fed.local_epochs,
                                     fed.max_steps_per_epoch)
    config = with_budget_chunk(config, task, frozen, trainable, steps)
    alg = method.make(config, task.loss_fn)
    state = alg.init(trainable, jax.random.fold_in(rng, 2))
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    start = checkpoint.latest(mngr) or 0
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    if start:
        state = checkpoint.restore(mngr, start, state=state)['state']
        log(f'resumed from round {start}')
    rows = read_rows(metrics_path, start)
    write_rows(metrics_path, rows)
    mesh = population.mesh_for(fed.num_devices)
    if mesh is not None:  # replicated once, so every round sees the same placement
        state, frozen = population.replicate(state, mesh), population.replicate(frozen, mesh)
    cost = comm.round_cost(alg.upload, state.trainable, fed.clients_per_round)
    full_up = lora.num_bytes(params)
    lora_up = lora.num_bytes(
        algorithms.get('fedgen_edge').variables(params, config, jax.random.PRNGKey(0))[1])
    log(f'uplink per client per round: {cost.up_per_client:,} B ({config.fed.algorithm}); '
        f'LoRA adapters {lora_up:,} B = {100 * lora_up / full_up:.3f}% of the full model '
        f'{full_up:,} B; local steps S={steps}')
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
            'train_loss': float(m['train_loss']),
            'delta_norm': float(m['delta_norm']),
            'up_bytes_round': cost.up_round,
            'down_bytes_round': cost.down_round,
            'up_bytes_total': totals['up_bytes'],
            'down_bytes_total': totals['down_bytes']
        }
        if (rnd + 1) % config.eval.every == 0 or rnd + 1 == fed.rounds:
            row.update(evaluate({**frozen, **state.trainable}))
            if config.eval.samples_every_eval:
                write_samples(
                    task_mod.samples(task, config, {
                        **frozen,
                        **state.trainable
                    }, jax.random.fold_in(rng, 3)), workdir, f'round{rnd + 1:04d}')
        row['round_s'] = round(time.time() - t0, 3)
        rows.append(row)
        write_rows(metrics_path, rows)
        last = [r[metric] for r in rows if metric in r]
        bar.set_postfix({
            'loss': f'{row["train_loss"]:.3f}',
            metric: f'{last[-1]:.2f}' if last else '-',
            'up_MB': f'{totals["up_bytes"] / 1e6:.2f}'
        })
    bar.close()
    checkpoint.wait(mngr)
    if end < fed.rounds:
        return {'stopped_after': end}

    variables = {**frozen, **state.trainable}
    # The last round was always evaluated; reuse it rather than sampling again.
    final = {k: v for k, v in rows[-1].items() if k in bb_metrics} if rows else {}
    if len(final) != len(bb_metrics):
        final = evaluate(variables)
    if task.test is not task.valid:
        final.update(task_mod.evaluator(task, config, 'test', aux)(variables))
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
        'up_bytes_per_round': cost.up_round,
        'up_bytes_total': totals['up_bytes'],
        'lora_share_of_full_uplink': lora_up / full_up,
        'local_steps': steps,
        'client_chunk': config.fed.client_chunk,
        'wall_s': round(time.time() - t_start, 1)
    }
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    log('\n' + '\n'.join(f'{k:>28s}  {v:,.4g}' if isinstance(v, float) else f'{k:>28s}  {v}'
                         for k, v in summary.items()))
    write_samples(task_mod.samples(task, config, variables, jax.random.fold_in(rng, 3)), workdir,
                  'final')
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
    app.run(main)
