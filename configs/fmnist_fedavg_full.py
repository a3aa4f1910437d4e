"""Full-model FedAvg on Fashion-MNIST: configs/fmnist_fedgen_edge.py with every U-Net weight
trained and uploaded (the baseline of claim 3 at the cpu scale).

    python -m experiments.train --config configs/fmnist_fedavg_full.py --workdir runs/fm_full

Same data, split, backbone recipe, server EMA and schedule as FedGen-Edge; the client step and
the one-client-at-a-time chunk are configs/cifar10_fedavg_full.py's.
"""
from configs import cifar10_fedavg_full, fmnist_fedgen_edge


def get_config(arg: str = ''):
    c = fmnist_fedgen_edge.get_config(arg)
    full = cifar10_fedavg_full.get_config('tiny' if arg == 'ci' else arg)
    c.fed.update(algorithm=full.fed.algorithm,
                 client_lr=full.fed.client_lr,
                 client_chunk=full.fed.client_chunk)
    return c
