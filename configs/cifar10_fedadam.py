"""FedAdam on CIFAR-10: FedGen-Edge adapters with an Adam server optimizer (Reddi et al. 2021).

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/cifar10_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/cifar10_fedadam.py \
        --workdir runs/c10_fedadam
    python -m experiments.train --config configs/cifar10_fedadam.py:tiny \
        --workdir runs/c10tiny_fedadam
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.server_opt = 'fedadam'
    c.fed.server_lr = 1e-2
    return c
