"""FedSA-LoRA-style split on PTB: the LoRA A matrices are federated, every B stays on its client.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_fedsa.py \
        --workdir runs/ptb_fedsa
    python -m experiments.train --config configs/ptb_fedsa.py:tiny \
        --workdir runs/tiny_fedsa
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedsa'
    return c
