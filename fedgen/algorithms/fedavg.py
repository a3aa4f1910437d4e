"""FedAvg over an arbitrary trainable tree, as an (init, apply) pair over an explicit ServerState.

One round t with sampled clients k = 1..C (padding clients have n_k = 0):

    w_k     = LocalUpdate_k(w_G^t)                 (client.make_local_update, mapped over clients)
    Delta   = sum_k (n_k / sum_j n_j) (w_k - w_G^t)  (aggregate.weighted_mean)
    w_G^t+1 = ServerOpt(w_G^t, g = -Delta)

With ServerOpt = sgd(1.0) this is plain FedAvg (w_G + Delta); adam gives FedAdam (Reddi et al.).
FedGen-Edge is this engine over the LoRA adapters with the backbone frozen; full-model FedAvg is
the same engine over every backbone leaf.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from fedgen import aggregate, client, population
from fedgen.data.batching import RoundData

PyTree = Any


@struct.dataclass
class ServerState:
    """round [] int32; trainable: global collections (e.g. {'lora': A_G}); rng: base key [2];
    clients: per-client persistent trees stacked [N, ...] for methods that keep them (Ditto's
    personal adapters, FedSA's local B blocks); {} for FedAvg."""
    round: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array
    clients: PyTree = struct.field(default_factory=dict)


class Algorithm(NamedTuple):
    """init(trainable, rng) -> ServerState; apply(state, frozen, RoundData) -> (state, metrics);
    upload(delta) -> the tree one client actually sends (for byte accounting)."""
    init: Callable
    apply: Callable
    upload: Callable


def client_keys(state: ServerState, client_ids: jax.Array) -> jax.Array:
    """Per-client keys fold_in(fold_in(rng, round), id): independent of chunking and order."""
    base = jax.random.fold_in(state.rng, state.round)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(client_ids)


def run_clients(local_update: Callable,
                state: ServerState,
                frozen: PyTree,
                data: RoundData,
                chunk: int,
                start: PyTree | None = None,
                mesh: Mesh | None = None) -> client.LocalResult:
    """Maps ``local_update`` over the round's clients; results are stacked [C, ...].

    ``start`` optionally gives per-client starting trees [C, ...] (default: the global tree).
    ``mesh`` (population.client_mesh) shards the client axis over devices; C must divide evenly."""
    per_client = {
        'data': {
            'batches': data.batches,
            'mask': data.mask
        },
        'rng': client_keys(state, data.client_ids)
    }
    if start is not None:
        per_client['start'] = start

    def one(shared, x):
        frz, w_g = shared
        w0 = x.get('start', w_g)
        return local_update(frz, w0, x['data'], x['rng'], w_g)

    return population.map_clients(one, (frozen, state.trainable), per_client, chunk, mesh=mesh)


def server_step(state: ServerState,
                avg_delta: PyTree,
                server_tx: optax.GradientTransformation,
                trainable: PyTree | None = None) -> ServerState:
    """Applies the server optimizer to the pseudo-gradient -avg_delta."""
    trainable = state.trainable if trainable is None else trainable
    neg = jax.tree.map(jnp.negative, avg_delta)
    updates, opt_state = server_tx.update(neg, state.opt_state, trainable)
    return state.replace(round=state.round + 1,
                         trainable=optax.apply_updates(trainable, updates),
                         opt_state=opt_state)


def round_metrics(res: client.LocalResult, data: RoundData) -> dict:
    """Train loss = sum over clients of loss sums / total weight; mean update norm."""
    norms = jax.vmap(optax.global_norm)(res.delta)
    active = (data.n_k > 0).astype(jnp.float32)
    return {
        'train_loss': res.loss_sum.sum() / jnp.maximum(res.weight.sum(), 1.0),
        'delta_norm': (norms * active).sum() / jnp.maximum(active.sum(), 1.0)
    }


def make(loss_fn: Callable,
         client_tx: optax.GradientTransformation,
         server_tx: optax.GradientTransformation,
         chunk: int,
         prox_mu: float = 0.0,
         mesh: Mesh | None = None) -> Algorithm:
    """FedAvg (prox_mu = 0) or FedProx (prox_mu > 0) over whatever tree ``init`` is given.

    With a ``mesh`` the round's clients are sharded over its 'clients' axis (see population)."""
    local_update = client.make_local_update(loss_fn, client_tx, prox_mu)

    def init(trainable: PyTree, rng: jax.Array) -> ServerState:
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state=server_tx.init(trainable),
                           rng=rng)

    def apply(state: ServerState, frozen: PyTree, data: RoundData):
        res = run_clients(local_update, state, frozen, data, chunk, mesh=mesh)
        new = server_step(state, aggregate.weighted_mean(res.delta, data.n_k), server_tx)
        return new, round_metrics(res, data)

    return Algorithm(init, apply, upload=lambda delta: delta)
