"""FedProx on PTB: LoRA adapters with a proximal term mu/2 ||A - A_G||^2 on every client.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_fedprox.py \
        --workdir runs/ptb_fedprox
    python -m experiments.train --config configs/ptb_fedprox.py:tiny \
        --workdir runs/tiny_fedprox
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.prox_target = 'lora'  # or 'full': FedProx over every backbone weight
    c.fed.algorithm = 'fedprox'
    c.fed.prox_mu = 0.01
    return c
