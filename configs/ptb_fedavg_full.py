"""Full-model FedAvg on PTB: the FedGen-Edge settings with every backbone weight trainable.

Same backbone recipe (pre-training is deterministic, so a fresh workdir pre-trains the identical
backbone; or point --config.pretrain.backbone_path at runs/ptb/backbone/<hash>), data, split and
optimizers; only ``fed.algorithm`` and the client learning rate differ:
    python -m experiments.train --config configs/ptb_fedavg_full.py --workdir runs/ptb_full
    python -m experiments.train --config configs/ptb_fedavg_full.py:tiny --workdir runs/tiny_full
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedavg_full'
    c.fed.client_lr = 1e-3  # the full model needs a smaller step than the adapters
    return c
