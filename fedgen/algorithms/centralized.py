"""Centralized LoRA on pooled client data: the upper bound with the same data and budget.

Each round pools the sampled clients' examples (the same RoundData a federated round gets), puts
the real ones first in a random order (padding last), and runs ONE sequential local update over
them in steps of the client batch size B:

    batches [C, S, B, ...] -> examples [C*S*B, ...] -> shuffled -> [C*S, B, ...]
    w_G^{t+1} = ServerOpt(w_G^t, -(LocalUpdate(w_G^t; pooled) - w_G^t))

So it sees exactly the examples federated clients see, but as one i.i.d.-shuffled SGD chain (no
client drift, no averaging). The optimizer starts fresh each round, as a client's does. Nothing is
uploaded in the federated sense (the raw data is pooled), so its uplink is reported as 0 bytes.
"""
import jax
import jax.numpy as jnp
import optax

from fedgen import client
from fedgen.algorithms import fedavg, fedgen_edge, optim


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """Same trees as FedGen-Edge: ({'params': backbone}, {'lora': adapters})."""
    return fedgen_edge.variables(backbone, config, rng)


def pool_round(batches: dict, key: jax.Array) -> dict:
    """{'batches': field -> [C*S, B, ...], 'mask': [C*S]}: real examples shuffled, padding last."""
    c, s, b = batches['weight'].shape
    flat = {k: v.reshape((c * s * b, ) + v.shape[3:]) for k, v in batches.items()}
    u = jax.random.uniform(key, (c * s * b, ))
    order = jnp.argsort(jnp.where(flat['weight'] > 0, u, 2.0 + u))
    pooled = {k: v[order].reshape((c * s, b) + v.shape[1:]) for k, v in flat.items()}
    return {'batches': pooled, 'mask': (pooled['weight'] > 0).any(-1).astype(jnp.float32)}


def make(config, loss_fn) -> fedavg.Algorithm:
    fed = config.fed
    client_tx = optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt', 'fed.client_lr')
    server_tx = optim.build(fed.server_opt, fed.server_lr, 'fed.server_opt', 'fed.server_lr')
    update = client.make_local_update(loss_fn, client_tx)

    def init(trainable, rng):
        return fedavg.ServerState(round=jnp.zeros((), jnp.int32),
                                  trainable=trainable,
                                  opt_state=server_tx.init(trainable),
                                  rng=rng)

    def apply(state, frozen, data):
        key = jax.random.fold_in(state.rng, state.round)
        pooled = pool_round(data.batches, jax.random.fold_in(key, 0))
        res = update(frozen, state.trainable, pooled, jax.random.fold_in(key, 1))
        new = fedavg.server_step(state, res.delta, server_tx)
        return new, {
            'train_loss': res.loss_sum / jnp.maximum(res.weight, 1.0),
            'delta_norm': optax.global_norm(res.delta)
        }

    return fedavg.Algorithm(init, apply, upload=lambda delta: {})
