"""Centralized training on the pooled examples of the round's sampled clients (an upper bound).

One shuffled sequential chain of optimizer steps over the pooled real examples (engine.pool_round),
then the server step w <- w + ServerOpt(-Delta). There is no client and nothing is sent; a
non-finite Delta is not applied (the round keeps the model and says clients_used 0).
"""
import jax
import jax.numpy as jnp
import optax

from fedgen.fl import local_update as client
from fedgen.fl import engine
from fedgen.fl import hparams
from fedgen.fl.algorithm import Algorithm, ServerState


def make(p, loss_fn, mesh=None) -> Algorithm:
    """The centralized Algorithm of MethodParams ``p`` (``mesh`` unused: one chain)."""
    del mesh
    update = client.make_local_update(loss_fn, p.client_tx)

    def init(trainable, rng):
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state=p.server_tx.init(trainable),
                           rng=rng,
                           clients={},
                           aux={})

    def apply(state, frozen, data):
        key, hp = jax.random.fold_in(state.rng, state.round), data.hparams
        pooled = engine.pool_round(data.batches, jax.random.fold_in(key, 0))
        res = update(frozen,
                     state.trainable,
                     pooled,
                     jax.random.fold_in(key, 1),
                     hp=hparams.client(hp, proximal=False))
        finite = engine.all_finite(jax.tree.map(lambda x: x[None], res.delta), 1)[0]
        delta = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), res.delta)
        stepped = engine.server_step(state, delta, p.server_tx, hparams.server(hp))
        new = engine.select(finite, stepped, state)
        sampled = (data.n_k > 0).astype(jnp.float32)
        return new.replace(round=state.round + 1), {
            'train_loss': jnp.where(finite, res.loss_sum, 0.0) / jnp.maximum(res.weight, 1.0),
            'delta_norm': jnp.where(finite, optax.global_norm(res.delta), 0.0),
            'clients_sampled': sampled.sum(),
            'clients_reported': sampled.sum(),
            'clients_used': jnp.where(finite, sampled.sum(), 0.0),
            'clients_nonfinite': jnp.where(finite, 0.0, sampled.sum()),
            'nonfinite_ids': jnp.full_like(data.client_ids, -1),
            'live': sampled * finite
        }

    nothing = lambda tree: {}  # noqa: E731
    return Algorithm(init, apply, nothing, nothing)
