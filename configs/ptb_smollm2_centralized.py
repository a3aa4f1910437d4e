"""Centralized LoRA on SmolLM2-135M and PTB: each round's sampled client data pooled and
shuffled (the upper bound), with configs/ptb_smollm2_fedgen_edge.py's adapters, budget and
variants ('', 'cpu', 'tiny'):
    python -m experiments.train --config configs/ptb_smollm2_centralized.py:cpu \
        --workdir runs/smollm2_central_cpu
"""
from configs import ptb_smollm2_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_smollm2_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'centralized'
    if arg == 'cpu':  # one model takes every pooled step of a round in sequence (16 at :cpu):
        c.fed.client_lr = 1e-3  # FedGen-Edge's 1e-2 diverged (8 rounds: valid PPL 5479)
    return c
