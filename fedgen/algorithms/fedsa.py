"""FedSA-LoRA (Guo et al. 2024): A is shared and averaged, B stays on each client.

It is :mod:`fedavg` with local leaves {'b'}: client k trains (A_G, B_k), uploads only its A update,
and keeps B_k in state.clients [N, ...]; the server aggregates A with any aggregator. There is
no global model to evaluate (the global B stays 0); each client's model is (A_G, B_k).
"""
from fedgen.algorithms import fedavg
from fedgen.fl.algorithm import Algorithm

LOCAL = frozenset({'b'})


def make(p, loss_fn, mesh=None) -> Algorithm:
    """The FedSA-LoRA Algorithm of MethodParams ``p``."""
    return fedavg.make(p, loss_fn, mesh, local_leaves=LOCAL)
