"""Local-only LoRA on PTB: each client trains its own adapter, no federation (0 uplink).

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_local_only.py \
        --workdir runs/ptb_local_only
    python -m experiments.train --config configs/ptb_local_only.py:tiny \
        --workdir runs/tiny_local_only
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'local_only'
    return c
