"""Full-model FedAvg baseline: the FedGen-Edge engine with every backbone leaf trainable.

Frozen: {} (nothing). Trainable: {'params': theta} starting from the same pre-trained backbone.
Every client uploads a full-size Delta theta_k, which is what the uplink comparison measures.
"""
import jax

from fedgen.algorithms import fedavg, fedgen_edge


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """(frozen, trainable) = ({}, {'params': backbone})."""
    del config, rng
    return {}, {'params': backbone}


def make(config, loss_fn) -> fedavg.Algorithm:
    # Identical engine and optimizers; only the trainable tree differs.
    return fedgen_edge.make(config, loss_fn)
