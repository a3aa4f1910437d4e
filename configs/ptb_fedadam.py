"""FedAdam on PTB: FedGen-Edge adapters with an Adam server optimizer (Reddi et al. 2021).

Same backbone recipe (the cached backbone is reused in the same workdir), data, split, client
optimizer and budget as configs/ptb_fedgen_edge.py; only the lines below differ:
    python -m experiments.train --config configs/ptb_fedadam.py \
        --workdir runs/ptb_fedadam
    python -m experiments.train --config configs/ptb_fedadam.py:tiny \
        --workdir runs/tiny_fedadam
"""
from configs import ptb_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_fedgen_edge.get_config(arg)
    c.fed.server_opt = 'fedadam'
    c.fed.server_lr = 1e-2  # Adam steps of ~lr per weight per round
    return c
