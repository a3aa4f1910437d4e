"""Full-model FedAvg of SmolLM2-135M on PTB: every one of the 134.5M weights trained by each
client and uploaded every round (the paper's full-FedAvg baseline on a real backbone).

Same data, split, clients, rounds, local steps and token budget as
configs/ptb_smollm2_fedgen_edge.py (variants '', 'cpu', 'tiny'); only the lines below differ:
    python -m experiments.train --config configs/ptb_smollm2_fedavg_full.py:cpu \
        --workdir runs/smollm2_full_cpu

Client learning rate: full fine-tuning of a pretrained LM takes far smaller Adam steps than its
LoRA adapters (1e-3). 3e-4 was the best of {1e-5, 3e-5, 1e-4, 3e-4, 1e-3} on the :cpu variant
(seed 0, 8 rounds of 4 of 40 clients: final valid PPL on 100 lines 138.1, 109.7, 87.4, 80.0,
109.0); experiments.reproduce tunes it on {3e-5, 1e-4, 3e-4, 1e-3}. Memory: each client holds
the weights, their gradient and two Adam moments (4 x 538 MB in float32), so the CPU variant
runs one client at a time.
"""
from configs import ptb_smollm2_fedgen_edge


def get_config(arg: str = ''):
    c = ptb_smollm2_fedgen_edge.get_config(arg)
    c.fed.algorithm = 'fedavg_full'
    c.fed.client_lr = 1e-3 if arg == 'tiny' else 3e-4
    return c
