"""Task modules: each exposes prepare(config) -> Task, recipe(config), describe(task),
build_backbone(task, rng), samples(task, variables, rng)."""
import importlib

import numpy as np

TASKS = ('ptb', 'cifar10')


def get(name: str):
    if name not in TASKS:
        raise ValueError(f'task must be one of {list(TASKS)}, got {name!r}')
    return importlib.import_module(f'fedgen.tasks.{name}')


def validate_split(config, partitions: tuple[str, ...]) -> None:
    """One-line ValueErrors for the public/partition/federation fields every task reads."""
    d, f = config.data, config.fed
    if not 0.0 < d.public_fraction < 1.0:
        raise ValueError(f'data.public_fraction must be in (0, 1), got {d.public_fraction}')
    if d.partition.kind not in partitions:
        raise ValueError(f'data.partition.kind must be one of {partitions}, got '
                         f'{d.partition.kind!r}')
    if not d.partition.alpha > 0:
        raise ValueError(f'data.partition.alpha must be > 0, got {d.partition.alpha}')
    if not (isinstance(f.num_clients, int) and f.num_clients >= 1):
        raise ValueError(f'fed.num_clients must be an int >= 1, got {f.num_clients!r}')
    if not 1 <= f.clients_per_round <= f.num_clients:
        raise ValueError(f'fed.clients_per_round must be in [1, fed.num_clients={f.num_clients}]'
                         f', got {f.clients_per_round}')


def client_sizes(client_train) -> dict:
    """Min / median / max local train size, for the run log."""
    sizes = np.array([len(i) for i in client_train])
    return {
        'client_train_min': int(sizes.min()),
        'client_train_median': float(np.median(sizes)),
        'client_train_max': int(sizes.max())
    }
