"""One run from its RunSpec, before and during its rounds: the workdir check, the setup (task,
backbone, variables, algorithm, initial state) and the packing of a round's client data.

Every entry point (experiments.train, experiments.sweep, the Flower apps) builds its runs here; the
round loop that consumes them is experiments.trainer.
"""
import json
import os

import jax
import numpy as np

from experiments import backbones, writers
from experiments.console import log
from experiments.runspec import RunSpec
from fedgen import algorithms, tasks
from fedgen.data import batching
from fedgen.fl import local_update as client
from fedgen.fl import mesh as population
from fedgen.lora import peft


def budget_chunk(spec: RunSpec, task: tasks.Task, p: algorithms.MethodParams, frozen, trainable,
                 steps: int, mesh) -> int:
    """fed.client_chunk, or, when fed.client_mem_budget_mb > 0, the chunk that fits the budget:
    floor(budget / bytes of one client), from XLA's memory analysis of one client's update."""
    c = spec.clients
    if not c.mem_budget_mb:
        return c.chunk
    one = batching.pack_clients(task.pool, task.client_train, [0], spec.seed, 0, c.batch_size,
                                c.local_epochs, steps, c.max_steps_per_epoch)
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
    local = -(-c.per_round // (mesh.size if mesh is not None else 1))
    chunk = population.chunk_for_budget(per, int(c.mem_budget_mb * 2**20), local, section='fed.')
    log(f'client chunk {chunk} from a {c.mem_budget_mb} MB budget '
        f'({per / 2**20:.1f} MB per client)')
    return chunk


def check_workdir(spec: RunSpec, workdir: str) -> None:
    """Refuses a workdir whose config.json is another run's (a field outside writers.RUN_FREE
    differs) with one line showing the difference; checkpoint.overwrite=True clears that run's
    outputs instead (the recipe-keyed caches stay)."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = writers.config_conflict(old, json.loads(spec.record))
    population.barrier('check_workdir')  # every process has read config.json before any write
    if not diff:
        return
    if not spec.schedule.overwrite:
        raise ValueError(f'workdir {workdir} holds a run of another config ({"; ".join(diff)}); '
                         'use another --workdir or --config.checkpoint.overwrite=True')
    if population.is_primary():
        gone = writers.clear_run(workdir)
        log(f'checkpoint.overwrite: removed the run of another config ({"; ".join(diff)}): '
            f'{", ".join(gone)}')
    population.barrier('clear_run')


def setup(spec: RunSpec, workdir: str) -> dict:
    """Everything a run (or a later personalization of it) needs, from its RunSpec (validated
    when it was built, before any data), before any round: the task, the frozen and trainable
    trees, the algorithm and its initial state."""
    init_from = spec.init_from
    if init_from and not os.path.isfile(os.path.join(init_from, 'adapter_config.json')):
        raise ValueError(f'lora.init_from: {init_from} holds no adapter_config.json (expected a '
                         'PEFT LoRA directory, e.g. one written by experiments.export)')
    log(f'loading the {spec.task} data...')
    task = spec.prepare_task()
    spec.preflight(task.backbone_shapes())
    p, rng = spec.method, jax.random.PRNGKey(spec.seed)
    log('loading the backbone (pre-training it when no cached copy exists)...')
    params, bb_info = backbones.pretrained(spec, task, workdir, rng)
    frozen, trainable = algorithms.variables(p, params, jax.random.fold_in(rng, 1))
    if init_from and not p.full_model:
        arch = task.info.get('model', {}).get('arch')
        if arch is None:
            raise ValueError(f'lora.init_from is implemented for text tasks, not {task.name!r}')
        trainable = {
            'lora':
            peft.initial_adapters(init_from, arch, p.lora.alpha, trainable['lora'], section='lora.')
        }
    c = spec.clients
    steps = batching.num_local_steps([len(i) for i in task.client_train],
                                     c.batch_size,
                                     c.local_epochs,
                                     c.max_steps_per_epoch,
                                     section='fed.')
    mesh = spec.mesh()
    chunk = budget_chunk(spec, task, p, frozen, trainable, steps, mesh)
    p, alg = spec.make_algorithm(task.loss_fn, chunk, mesh)
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


def round_data(spec: RunSpec, task: tasks.Task, steps: int, rnd: int, mesh, rows: tuple[int, int],
               width: int) -> batching.RoundData:
    """Round ``rnd``'s RoundData, [width, ...] on the client axis (padding clients n_k = 0):
    this process packs only its rows [lo, hi) and, with a mesh, the global arrays are
    assembled from every process's rows."""
    c = spec.clients
    ids, present = spec.sample_round(rnd)
    lo, hi = rows
    mine = ids[lo:hi]
    pack = lambda i: batching.pack_clients(task.pool, task.client_train, i, spec.seed, rnd, c.
                                           batch_size, c.local_epochs, steps, c.max_steps_per_epoch)
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
