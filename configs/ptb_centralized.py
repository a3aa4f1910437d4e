"""Centralized LoRA on PTB: each round's sampled client data pooled, shuffled (upper bound).

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_centralized.py \
        --workdir runs/ptb_centralized
    python -m experiments.train --config configs/ptb_centralized.py:tiny \
        --workdir runs/tiny_centralized
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'centralized'
    return c
