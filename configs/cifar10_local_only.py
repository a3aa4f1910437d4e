"""Local-only LoRA on CIFAR-10: each client trains its own adapter; no federation.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/cifar10_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/cifar10_local_only.py \
        --workdir runs/c10_local_only
    python -m experiments.train --config configs/cifar10_local_only.py:tiny \
        --workdir runs/c10tiny_local_only
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'local_only'
    return c
