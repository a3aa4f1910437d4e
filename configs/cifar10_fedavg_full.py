"""Full-model FedAvg on CIFAR-10: the FedGen-Edge settings with every U-Net weight trainable.

Same backbone recipe (reused from the workdir cache), data, split and optimizers:
    python -m experiments.train --config configs/cifar10_fedavg_full.py --workdir runs/c10
"""
from configs import cifar10_fedgen_edge


def get_config(arg: str = ''):
    c = cifar10_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedavg_full'
    c.fed.client_lr = 2e-4  # the full model needs a smaller step than the adapters
    # vmapping clients whose conv kernels differ becomes grouped convolutions, slow on a CPU
    # (docs/performance.md): run full-model U-Net clients one at a time there.
    c.fed.client_chunk = 1
    return c
