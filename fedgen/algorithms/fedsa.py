"""FedSA-LoRA-style split (Guo et al. 2024): the A matrices are shared, the B matrices stay local.

Client k adapts with (A, B_k): it starts each round from the broadcast A_G^t and its own B_k, and
runs the usual local update on both. Only Delta A_k is uploaded and averaged,

    A_G^{t+1} = ServerOpt(A_G^t, -sum_k (n_k / sum_j n_j) Delta A_k),     B_k <- B_k + Delta B_k,

so the uplink is bytes(A) alone. The local B blocks [N, ...] are kept in ``ServerState.clients``
(in a deployment each client stores its own; they never leave it). The global tree keeps B = 0, so
the "global" model alone is the backbone: FedSA is evaluated through its personal models
(A_G, B_k). B starts at 0 (LoRA init), so round 1 only moves B (dL/dA = 0 while B = 0).
"""
import jax
import jax.numpy as jnp

from fedgen import aggregate, client
from fedgen.algorithms import client_state, fedavg, fedgen_edge, optim

LOCAL = frozenset({'b'})


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """Same trees as FedGen-Edge: ({'params': backbone}, {'lora': {.., 'a': A, 'b': B}})."""
    return fedgen_edge.variables(backbone, config, rng)


def upload(delta: dict) -> dict:
    """What a client sends: the A blocks of its update only."""
    return client_state.split(delta, LOCAL)[0]


def make(config, loss_fn) -> fedavg.Algorithm:
    fed = config.fed
    client_tx = optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    server_tx = optim.build(fed.server_opt, fed.server_lr, 'fed.server_opt', 'fed.server_lr')
    update = client.make_local_update(loss_fn, client_tx, fed.prox_mu)

    def init(trainable, rng):
        local = client_state.split(trainable, LOCAL)[1]
        return fedavg.ServerState(round=jnp.zeros((), jnp.int32),
                                  trainable=trainable,
                                  opt_state=server_tx.init(trainable),
                                  rng=rng,
                                  clients=client_state.tile(local, fed.num_clients))

    def apply(state, frozen, data):
        c = data.client_ids.shape[0]
        shared = client_state.split(state.trainable, LOCAL)[0]
        start = client_state.join(client_state.tile(shared, c),
                                  client_state.gather(state.clients, data.client_ids))
        res = fedavg.run_clients(update, state, frozen, data, fed.client_chunk, start=start)
        up, local_delta = client_state.split(res.delta, LOCAL)
        avg = aggregate.weighted_mean(up, data.n_k)
        # The global B gets a zero pseudo-gradient: it stays at its initial value (0).
        zeros = jax.tree.map(jnp.zeros_like, client_state.split(state.trainable, LOCAL)[1])
        new = fedavg.server_step(state, client_state.join(avg, zeros), server_tx)
        new = new.replace(
            clients=client_state.scatter_add(state.clients, data.client_ids, local_delta))
        return new, fedavg.round_metrics(res, data)

    return fedavg.Algorithm(init, apply, upload=upload)


def personal(state: fedavg.ServerState) -> dict:
    """Every client's adapter (A_G, B_k), stacked [N, ...]."""
    n = jax.tree.leaves(state.clients)[0].shape[0]
    shared = client_state.split(state.trainable, LOCAL)[0]
    return client_state.join(client_state.tile(shared, n), state.clients)
