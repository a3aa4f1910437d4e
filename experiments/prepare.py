"""One run from its config, before and during its rounds: the workdir check, the setup (task,
backbone, variables, algorithm, initial state) and the packing of a round's client data.

Every entry point (experiments.train, experiments.sweep, the Flower apps) builds its runs here; the
round loop that consumes them is experiments.trainer.
"""
import json
import os

import jax
import numpy as np

from experiments import backbones, writers
from experiments import translate
from experiments.console import log
from fedgen import algorithms, tasks
from fedgen.data import batching
from fedgen.fl import local_update as client
from fedgen.fl import mesh as population
from fedgen.lora import peft


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
    log(f'loading the {config.task} data...')
    task = translate.prepare_task(config)
    p = translate.preflight(config, task)
    rng = jax.random.PRNGKey(config.seed)
    log('loading the backbone (pre-training it when no cached copy exists)...')
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
