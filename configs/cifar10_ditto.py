"""Ditto on CIFAR-10: FedAvg adapters plus a personal adapter per client, pulled to the global.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/cifar10_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/cifar10_ditto.py \
        --workdir runs/c10_ditto
    python -m experiments.train --config configs/cifar10_ditto.py:tiny \
        --workdir runs/c10tiny_ditto
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.ditto_lambda = 0.1
    c.fed.algorithm = 'ditto'
    return c
