"""Ditto on PTB: FedAvg adapters plus a personal adapter per client, pulled to the global by lambda.

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_ditto.py \
        --workdir runs/ptb_ditto
    python -m experiments.train --config configs/ptb_ditto.py:tiny \
        --workdir runs/tiny_ditto
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.ditto_lambda = 0.1
    c.fed.algorithm = 'ditto'
    return c
