"""Task modules: each exposes prepare(config) -> Task, recipe(config), describe(task),
build_backbone(task, rng), samples(task, variables, rng)."""
import importlib

TASKS = ('ptb', 'cifar10')


def get(name: str):
    if name not in TASKS:
        raise ValueError(f'task must be one of {list(TASKS)}, got {name!r}')
    return importlib.import_module(f'fedgen.tasks.{name}')
