"""Ditto (Li et al. 2021): a FedAvg global model plus a personal model per client.

Each sampled client k runs two local updates from the round's broadcast w_G^t on the same batches:

    global:    w_k = LocalUpdate_k(w_G^t)                     (uploaded; FedAvg as usual)
    personal:  v_k <- LocalUpdate_k(v_k) on  L_k(v) + (lambda / 2) ||v - w_G^t||^2

The personal trees v [N, ...] live in ``ServerState.clients`` (in a deployment each client keeps
its own row; it is never uploaded, so uplink equals FedAvg's). They start at the initial global
tree. ``fed.ditto_lambda`` (> 0) is lambda; the personal steps use the client optimizer.
"""
import jax
import jax.numpy as jnp

from fedgen import aggregate, client
from fedgen.algorithms import client_state, fedavg, fedgen_edge, optim


def _lam(config) -> float:
    lam = config.fed.get('ditto_lambda', None)
    if not (isinstance(lam, (int, float)) and lam > 0):
        raise ValueError(f'fed.ditto_lambda must be a number > 0, got {lam!r}')
    return float(lam)


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """Same trees as FedGen-Edge: ({'params': backbone}, {'lora': adapters})."""
    _lam(config)
    return fedgen_edge.variables(backbone, config, rng)


def make(config, loss_fn) -> fedavg.Algorithm:
    fed = config.fed
    lam = _lam(config)
    client_tx = optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    server_tx = optim.build(fed.server_opt, fed.server_lr, 'fed.server_opt', 'fed.server_lr')
    global_update = client.make_local_update(loss_fn, client_tx, fed.prox_mu)
    personal_update = client.make_local_update(loss_fn, client_tx, lam)

    def init(trainable, rng):
        return fedavg.ServerState(round=jnp.zeros((), jnp.int32),
                                  trainable=trainable,
                                  opt_state=server_tx.init(trainable),
                                  rng=rng,
                                  clients=client_state.tile(trainable, fed.num_clients))

    def apply(state, frozen, data):
        g = fedavg.run_clients(global_update, state, frozen, data, fed.client_chunk)
        # Personal steps draw their own keys; their anchor is run_clients' w_G^t (pre-round).
        v0 = client_state.gather(state.clients, data.client_ids)
        p = fedavg.run_clients(personal_update,
                               state.replace(rng=jax.random.fold_in(state.rng, 1)),
                               frozen,
                               data,
                               fed.client_chunk,
                               start=v0)
        new = fedavg.server_step(state, aggregate.weighted_mean(g.delta, data.n_k), server_tx)
        new = new.replace(clients=client_state.scatter_add(state.clients, data.client_ids, p.delta))
        metrics = fedavg.round_metrics(g, data)
        metrics['personal_train_loss'] = p.loss_sum.sum() / jnp.maximum(p.weight.sum(), 1.0)
        return new, metrics

    return fedavg.Algorithm(init, apply, upload=lambda delta: delta)


def personal(state: fedavg.ServerState) -> dict:
    """Every client's personal tree [N, ...]."""
    return state.clients
