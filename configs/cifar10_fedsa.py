"""FedSA-LoRA-style split on CIFAR-10: LoRA A matrices federated, every B stays on its client.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/cifar10_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/cifar10_fedsa.py \
        --workdir runs/c10_fedsa
    python -m experiments.train --config configs/cifar10_fedsa.py:tiny \
        --workdir runs/c10tiny_fedsa
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedsa'
    return c
