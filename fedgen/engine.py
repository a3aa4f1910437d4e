"""The one federated engine. Every method is :func:`make` with typed hyper-parameters.

One round t over the sampled clients k = 1..C (padding clients have n_k = 0 and masked steps):

    start_k   = download(w_G^t) (+ client k's kept leaves, for FedSA / local-only / Ditto)
    w_k       = LocalUpdate_k(start_k)                   (client.make_local_update, mapped)
    u_k       = upload(w_k - start_k)                    (what client k sends)
    Delta     = reduce({u_k}, weights_k)                 (default: sum_k n_k u_k / sum_j n_j)
    w_G^t+1   = ServerOpt(w_G^t, g = -Delta)             (sgd(1.0) = FedAvg)

The variants are fields of :class:`Federation`, not code paths of their own:

- ``prox_mu > 0``: FedProx's local objective L_k(w) + (mu/2) ||w - w_G^t||^2;
- ``local_leaves`` (e.g. {'b'}): those leaves stay on the client, kept in ``state.clients``
  [N, ...] and never uploaded or broadcast (FedSA-LoRA: A shared, B local);
- ``keep_local``: the whole tree stays on the client (local-only; nothing is sent);
- ``personal_lambda > 0``: Ditto's second, personal update per client,
  v_k <- LocalUpdate_k(v_k) on L_k(v) + (lambda/2)||v - w_G^t||^2, kept in ``state.clients``;
- ``pooled``: centralized training on the pooled examples of the sampled clients (one
  shuffled sequential chain; no client, nothing sent);
- ``reducer``: the server's reduction over the stacked [C, ...] uploads (weighted mean by
  default; robust and private reductions plug in here);
- ``faults``: dropouts and stragglers (fates.draw: masks from fold_in(key, client id)) and
  simulated attackers (attacks.apply on the uploads), all inside the one compiled round.

Who counts. A sampled client k with n_k > 0 either reports (fate report_k = 1) or drops after the
download; a straggler's step mask keeps only its first ceil(f_k S_k) real steps. An upload with a
NaN or inf anywhere gets weight 0 (and is zeroed, since 0 * NaN = NaN). The reduction weights are

    used_k = n_k * report_k * finite_k,

and the round's metrics say how many clients were sampled, reported and used, and which ids sent
non-finite updates (``nonfinite_ids`` [C], -1 where finite). A client that drops loses its round:
kept per-client leaves (FedSA's B, local-only, Ditto) are not updated either.

Client keys are fold_in(fold_in(rng, round), client id), so results do not depend on chunking,
device count or client order; the mesh (population.client_mesh) shards the client axis.
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedgen import aggregate, attacks, client, client_state, fates, population, robust
from fedgen.base import Algorithm, ServerState
from fedgen.data.batching import RoundData

PyTree = Any
# reduce(uploads [C, ...], weights [C], key, aux) -> (mean tree, new aux, metrics dict)
# Key streams besides the clients' fold_in(fold_in(rng, round), id): fold_in(fold_in(rng, STREAM),
# round), with STREAM far above any round number, so no stream ever meets a client's key.
SERVER_STREAM = 2**30 + 1
FATE_STREAM = 2**30 + 2
ATTACK_STREAM = 2**30 + 3
Reducer = Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple]


def weighted_mean_reducer(uploads: PyTree, weights: jax.Array, key: jax.Array, aux: PyTree):
    """FedAvg's reduction: sum_k (w_k / sum_j w_j) u_k."""
    del key
    return aggregate.weighted_mean(uploads, weights), aux, {}


@dataclasses.dataclass(frozen=True)
class Faults:
    """Simulated faults (config ``fed.dropout_rate``, ``fed.straggler_rate``,
    ``fed.straggler_min_frac`` and ``fed.attack.*``); the defaults simulate none.

    The rates here are the run's defaults; a round may carry its own (RoundData.rates, traced, so
    changing them never recompiles). Attackers are a fixed set of client ids (attacks.attacker_ids
    from ``attack_seed``); ``attack`` is one of attacks.KINDS."""
    dropout: float = 0.0
    straggler: float = 0.0
    straggler_min_frac: float = 1.0
    attack: str = 'none'
    attack_fraction: float = 0.0
    attack_scale: float = 1.0
    attack_noise_norm: float = 1.0
    attack_seed: int = 0

    def __post_init__(self):
        fates.check_rates(self.dropout, self.straggler, self.straggler_min_frac, 0.0)
        attacks.check(self.attack, self.attack_fraction, self.attack_scale, self.attack_noise_norm)

    def rates(self) -> fates.FateRates:
        return fates.FateRates.of(self.dropout, self.straggler, self.straggler_min_frac)


@dataclasses.dataclass(frozen=True)
class Federation:
    """Typed hyper-parameters of a federated method (see the module docstring).

    client_tx / server_tx: optax optimizers (server_tx None: there is no global update);
    num_clients: N, the population size (rows of ``state.clients``); chunk: clients per vmap.
    """
    client_tx: optax.GradientTransformation
    server_tx: Optional[optax.GradientTransformation]
    num_clients: int
    chunk: int = 1
    prox_mu: float = 0.0
    local_leaves: frozenset = frozenset()
    keep_local: bool = False
    personal_lambda: float = 0.0
    pooled: bool = False
    reducer: Reducer = weighted_mean_reducer
    aux_init: Callable[[PyTree], PyTree] = lambda trainable: {}
    faults: Faults = Faults()

    def __post_init__(self):
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ValueError(f'fed.num_clients must be an int >= 1, got {self.num_clients!r}')
        if not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f'fed.client_chunk must be an int >= 1, got {self.chunk!r}')
        if self.prox_mu < 0:
            raise ValueError(f'fed.prox_mu must be >= 0, got {self.prox_mu}')


def client_keys(state: ServerState, client_ids: jax.Array) -> jax.Array:
    """Per-client keys fold_in(fold_in(rng, round), id) [C, 2]."""
    base = jax.random.fold_in(state.rng, state.round)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(client_ids)


def stream_key(state: ServerState, stream: int) -> jax.Array:
    """This round's key of a named stream: fold_in(fold_in(rng, stream), round)."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, stream), state.round)


def run_clients(local_update: Callable,
                state: ServerState,
                frozen: PyTree,
                data: RoundData,
                chunk: int,
                start: PyTree | None = None,
                mesh: Mesh | None = None,
                anchor: PyTree | None = None) -> client.LocalResult:
    """Maps ``local_update`` over the round's clients; results are stacked [C, ...].

    ``start``: per-client starting trees [C, ...] (default: ``anchor``, broadcast);
    ``anchor``: the proximal anchor w_G^t (default: the global tree ``state.trainable``).
    ``mesh`` shards the client axis over devices (C must be a multiple of its size)."""
    per_client = {
        'data': {
            'batches': data.batches,
            'mask': data.mask
        },
        'rng': client_keys(state, data.client_ids)
    }
    if start is not None:
        per_client['start'] = start
    anchor = state.trainable if anchor is None else anchor

    def one(shared, x):
        frz, w_g = shared
        return local_update(frz, x.get('start', w_g), x['data'], x['rng'], w_g)

    return population.map_clients(one, (frozen, anchor), per_client, chunk, mesh=mesh)


def server_step(state: ServerState, avg_delta: PyTree,
                server_tx: optax.GradientTransformation) -> ServerState:
    """w_G <- w_G + ServerOpt(-avg_delta): the server optimizer sees the pseudo-gradient."""
    neg = jax.tree.map(jnp.negative, avg_delta)
    updates, opt_state = server_tx.update(neg, state.opt_state, state.trainable)
    return state.replace(trainable=optax.apply_updates(state.trainable, updates),
                         opt_state=opt_state)


def round_metrics(res: client.LocalResult, ids: jax.Array, n_k: jax.Array, report: jax.Array,
                  finite: jax.Array) -> dict:
    """train_loss: loss sums / loss weight over reporting clients; delta_norm: mean update norm
    over the clients used; counts of clients sampled / reported / used / non-finite, and
    nonfinite_ids [C] (the client id where the upload was non-finite, else -1)."""
    sampled = (n_k > 0).astype(jnp.float32)
    reported = sampled * report
    used = reported * finite
    norms = jax.vmap(optax.global_norm)(res.delta)
    bad = reported * (1.0 - finite)
    return {
        'train_loss': (res.loss_sum * reported).sum() / jnp.maximum(
            (res.weight * reported).sum(), 1.0),
        'delta_norm': jnp.where(used > 0, norms, 0.0).sum() / jnp.maximum(used.sum(), 1.0),
        'clients_sampled': sampled.sum(),
        'clients_reported': reported.sum(),
        'clients_used': used.sum(),
        'clients_nonfinite': bad.sum(),
        'nonfinite_ids': jnp.where(bad > 0, ids, -1)
    }


def all_finite(tree: PyTree, c: int) -> jax.Array:
    """[C] bool: client k's rows of every [C, ...] leaf are finite (all True for an empty tree)."""
    if not jax.tree.leaves(tree):
        return jnp.ones((c, ), bool)
    return robust.finite_mask(tree)


def zero_where(tree: PyTree, keep: jax.Array) -> PyTree:
    """Rows k of every [C, ...] leaf with keep_k = 0 set to 0 (NaN-safe, unlike multiplying)."""
    return jax.tree.map(
        lambda x: jnp.where(keep.reshape((-1, ) + (1, ) * (x.ndim - 1)) > 0, x, 0).astype(x.dtype),
        tree)


def pool_round(batches: dict, key: jax.Array) -> dict:
    """Pooled examples for centralized training: {'batches': field -> [C*S, B, ...], 'mask'}.

    [C, S, B, ...] -> [C*S*B, ...] -> real examples in a random order, padding last ->
    [C*S, B, ...]; a step is real when it holds at least one real example."""
    c, s, b = batches['weight'].shape
    flat = {k: v.reshape((c * s * b, ) + v.shape[3:]) for k, v in batches.items()}
    u = jax.random.uniform(key, (c * s * b, ))
    order = jnp.argsort(jnp.where(flat['weight'] > 0, u, 2.0 + u))
    pooled = {k: v[order].reshape((c * s, b) + v.shape[1:]) for k, v in flat.items()}
    return {'batches': pooled, 'mask': (pooled['weight'] > 0).any(-1).astype(jnp.float32)}


def make(fed: Federation, loss_fn: Callable, mesh: Mesh | None = None) -> Algorithm:
    """The :class:`~fedgen.base.Algorithm` of ``fed`` for a task's ``loss_fn``."""
    update = client.make_local_update(loss_fn, fed.client_tx, fed.prox_mu)
    personal_update = (client.make_local_update(loss_fn, fed.client_tx, fed.personal_lambda)
                       if fed.personal_lambda > 0 else None)
    local = fed.local_leaves

    def shared_of(tree):
        return client_state.split(tree, local)[0] if local else tree

    def upload(delta):
        return {} if fed.keep_local or fed.pooled else shared_of(delta)

    def download(trainable):
        return {} if fed.keep_local or fed.pooled else shared_of(trainable)

    def init(trainable: PyTree, rng: jax.Array) -> ServerState:
        if fed.keep_local or fed.personal_lambda > 0:
            kept = client_state.tile(trainable, fed.num_clients)
        elif local:
            kept = client_state.tile(client_state.split(trainable, local)[1], fed.num_clients)
        else:
            kept = {}
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state=fed.server_tx.init(trainable) if fed.server_tx else {},
                           rng=rng,
                           clients=kept,
                           aux=fed.aux_init(trainable))

    def centralized(state, frozen, data):
        key = jax.random.fold_in(state.rng, state.round)
        pooled = pool_round(data.batches, jax.random.fold_in(key, 0))
        res = update(frozen, state.trainable, pooled, jax.random.fold_in(key, 1))
        new = server_step(state, res.delta, fed.server_tx)
        sampled = (data.n_k > 0).sum().astype(jnp.float32)
        finite = all_finite(jax.tree.map(lambda x: x[None], res.delta), 1)[0]
        return new.replace(round=state.round + 1), {
            'train_loss': res.loss_sum / jnp.maximum(res.weight, 1.0),
            'delta_norm': optax.global_norm(res.delta),
            'clients_sampled': sampled,
            'clients_reported': sampled,
            'clients_used': jnp.where(finite, sampled, 0.0),
            'clients_nonfinite': jnp.where(finite, 0.0, sampled),
            'nonfinite_ids': jnp.full_like(data.client_ids, -1)
        }

    faults = fed.faults

    def apply(state: ServerState, frozen: PyTree, data: RoundData):
        if fed.pooled:
            return centralized(state, frozen, data)
        ids, c = data.client_ids, data.client_ids.shape[0]
        rates = faults.rates() if data.rates is None else data.rates
        fate = fates.draw(stream_key(state, FATE_STREAM), ids, rates)
        data = data.replace(mask=fates.apply_steps(data.mask, fate.step_frac))
        if fed.keep_local:
            start = client_state.gather(state.clients, ids)
        elif local:
            start = client_state.join(client_state.tile(shared_of(state.trainable), c),
                                      client_state.gather(state.clients, ids))
        else:
            start = None
        res = run_clients(update, state, frozen, data, fed.chunk, start=start, mesh=mesh)
        sent = upload(res.delta)
        if faults.attack != 'none':
            bad = attacks.attacker_mask(ids, fed.num_clients, faults.attack_fraction,
                                        faults.attack_seed)
            sent = attacks.apply(faults.attack, sent, bad, stream_key(state, ATTACK_STREAM),
                                 faults.attack_scale, faults.attack_noise_norm)
        kept = {} if not (fed.keep_local or local) else (
            res.delta if fed.keep_local else client_state.split(res.delta, local)[1])
        finite = (all_finite(sent, c) & all_finite(kept, c)).astype(jnp.float32)
        metrics = round_metrics(res, ids, data.n_k, fate.report, finite)
        live = fate.report * finite  # this client's work counts this round
        weights = data.n_k * live
        new = state
        if fed.keep_local:
            new = new.replace(
                clients=client_state.scatter_add(state.clients, ids, zero_where(res.delta, live)))
        else:
            avg, aux, extra = fed.reducer(zero_where(sent, live), weights,
                                          stream_key(state, SERVER_STREAM), state.aux)
            metrics.update(extra)
            if local:  # the kept leaves get a zero pseudo-gradient: the global copy stays put
                zeros = jax.tree.map(jnp.zeros_like, client_state.split(state.trainable, local)[1])
                avg = client_state.join(avg, zeros)
                new = new.replace(
                    clients=client_state.scatter_add(state.clients, ids, zero_where(kept, live)))
            new = server_step(new, avg, fed.server_tx).replace(aux=aux)
        if personal_update is not None:
            # Ditto: personal steps draw their own keys; their anchor is the pre-round w_G^t.
            p = run_clients(personal_update,
                            state.replace(rng=jax.random.fold_in(state.rng, 1)),
                            frozen,
                            data,
                            fed.chunk,
                            start=client_state.gather(state.clients, ids),
                            mesh=mesh)
            live_p = live * all_finite(p.delta, c)
            new = new.replace(
                clients=client_state.scatter_add(state.clients, ids, zero_where(p.delta, live_p)))
            metrics['personal_train_loss'] = p.loss_sum.sum() / jnp.maximum(p.weight.sum(), 1.0)
        return new.replace(round=state.round + 1), metrics

    def personal(state: ServerState) -> PyTree:
        if fed.keep_local or fed.personal_lambda > 0:
            return state.clients
        n = jax.tree.leaves(state.clients)[0].shape[0]
        return client_state.join(client_state.tile(shared_of(state.trainable), n), state.clients)

    has_personal = fed.keep_local or fed.personal_lambda > 0 or bool(local)
    return Algorithm(init, apply, upload, download, personal if has_personal else None)
