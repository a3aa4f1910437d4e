"""Centralized LoRA on CIFAR-10: the sampled clients' data pooled, shuffled (upper bound).

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/cifar10_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/cifar10_centralized.py \
        --workdir runs/c10_centralized
    python -m experiments.train --config configs/cifar10_centralized.py:tiny \
        --workdir runs/c10tiny_centralized
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'centralized'
    return c
