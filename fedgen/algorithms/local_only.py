"""Local-only adapters: every client trains its own adapter, nothing is ever sent or averaged.

Rounds sample clients exactly like the federated methods (same compute per round); a sampled
client continues from its own adapter v_k (all start from the same initial adapter):

    v_k <- LocalUpdate_k(v_k)        (no anchor, no proximal term)

The adapters [N, ...] are kept in ``ServerState.clients``; the global tree never changes (so the
global metric is the initial adapter's, i.e. the backbone's). Uplink is 0 bytes.
"""
import jax
import jax.numpy as jnp

from fedgen import client
from fedgen.algorithms import client_state, fedavg, fedgen_edge, optim


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """Same trees as FedGen-Edge: ({'params': backbone}, {'lora': adapters})."""
    return fedgen_edge.variables(backbone, config, rng)


def make(config, loss_fn) -> fedavg.Algorithm:
    fed = config.fed
    client_tx = optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    update = client.make_local_update(loss_fn, client_tx)

    def init(trainable, rng):
        return fedavg.ServerState(round=jnp.zeros((), jnp.int32),
                                  trainable=trainable,
                                  opt_state={},
                                  rng=rng,
                                  clients=client_state.tile(trainable, fed.num_clients))

    def apply(state, frozen, data):
        start = client_state.gather(state.clients, data.client_ids)
        res = fedavg.run_clients(update, state, frozen, data, fed.client_chunk, start=start)
        new = state.replace(round=state.round + 1,
                            clients=client_state.scatter_add(state.clients, data.client_ids,
                                                             res.delta))
        return new, fedavg.round_metrics(res, data)

    return fedavg.Algorithm(init, apply, upload=lambda delta: {})


def personal(state: fedavg.ServerState) -> dict:
    """Every client's own adapter [N, ...]."""
    return state.clients
