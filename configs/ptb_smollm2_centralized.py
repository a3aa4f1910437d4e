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
    return c
