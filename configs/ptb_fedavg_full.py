"""Full-model FedAvg on PTB: the FedGen-Edge settings with every backbone weight trainable.

Same backbone recipe (so the cached backbone is reused in the same workdir), data, split and
optimizers; only ``fed.algorithm`` differs:
    python -m experiments.train --config configs/ptb_fedavg_full.py --workdir runs/ptb_full
    python -m experiments.train --config configs/ptb_fedavg_full.py:tiny --workdir runs/tiny_full
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedavg_full'
    c.fed.client_lr = 1e-3  # the full model needs a smaller step than the adapters
    return c
