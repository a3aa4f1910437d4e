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
  simulated attackers (attacks.apply on the uploads), all inside the one compiled round;
- ``lora_agg``: a LoRA-specific aggregation (fedgen.lora_aggregation: FedEx-LoRA's residual,
  FlexLoRA's SVD, FFA-LoRA, FLoRA stacking) in place of ``reducer``; the server-side frozen delta
  dW it keeps lives in ``state.aux['delta']`` and every client runs on W0 + dW;
- ``client_ranks``: heterogeneous ranks r_k <= r_max as a mask on the rank axis: client k starts
  from the global adapter with A's columns and B's rows beyond r_k zeroed, so they get exactly
  zero gradient and one program serves every rank.

A round may carry traced values that override compile-time ones, so changing them never
recompiles: fate rates (``RoundData.rates``) and learning-rate multiples and the proximal mu
(``RoundData.hparams``, fedgen/hparams.py); a vmapped sweep gives each run its own.

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
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedgen import (aggregate, attacks, client, client_state, fates, hparams, lora_aggregation,
                    lora_ranks, population, robust)
from fedgen.base import Algorithm, ServerState
from fedgen.data.batching import RoundData

PyTree = Any
# reduce(uploads [C, ...], weights [C], key, aux, info) -> (mean tree, new aux, metrics dict);
# info = {'ids': [C], 'sampled': [C] (n_k > 0), 'live': [C] (reported and finite)}.
# Key streams besides the clients' fold_in(fold_in(rng, round), id): fold_in(fold_in(rng, STREAM),
# round), with STREAM far above any round number, so no stream ever meets a client's key.
SERVER_STREAM = 2**30 + 1
FATE_STREAM = 2**30 + 2
ATTACK_STREAM = 2**30 + 3
Reducer = Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple]


def weighted_mean_reducer(uploads: PyTree, weights: jax.Array, key: jax.Array, aux: PyTree,
                          info: dict):
    """FedAvg's reduction: sum_k (w_k / sum_j w_j) u_k."""
    del key, info
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
    lora_agg: Optional[lora_aggregation.LoraAggregation] = None
    client_ranks: Optional[tuple] = None

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
                anchor_is_start: bool = False) -> client.LocalResult:
    """Maps ``local_update`` over the round's clients; results are stacked [C, ...].

    ``start``: per-client starting trees [C, ...] (default: the global tree, broadcast); the
    proximal anchor is the global tree w_G^t, or each client's own start (``anchor_is_start``:
    its rank-masked copy of w_G^t). ``mesh`` shards the client axis over devices (C must be a
    multiple of its size)."""
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
        return local_update(frz, w0, x['data'], x['rng'], w0 if anchor_is_start else w_g)

    return population.map_clients(one, (frozen, state.trainable), per_client, chunk, mesh=mesh)


def server_step(state: ServerState,
                avg_delta: PyTree,
                server_tx: optax.GradientTransformation,
                lr_scale=None) -> ServerState:
    """w_G <- w_G + s ServerOpt(-avg_delta): the server optimizer sees the pseudo-gradient; s is
    a traced learning-rate multiple (fedgen/hparams.py), None for 1."""
    neg = jax.tree.map(jnp.negative, avg_delta)
    updates, opt_state = server_tx.update(neg, state.opt_state, state.trainable)
    updates = hparams.scale(updates, lr_scale)
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
    local, faults = fed.local_leaves, fed.faults
    agg = lora_aggregation.make(fed.lora_agg) if fed.lora_agg is not None else None
    with_delta = agg is not None and fed.lora_agg.method in lora_aggregation.WITH_DELTA
    sets_global = agg is not None and fed.lora_agg.method in lora_aggregation.NO_SERVER_OPT
    ranks = None if fed.client_ranks is None else jnp.asarray(fed.client_ranks, jnp.int32)

    def shared_of(tree):
        return client_state.split(tree, local)[0] if local else tree

    def upload(delta):
        if fed.keep_local or fed.pooled:
            return {}
        sent = shared_of(delta)
        return {**sent, 'lora': agg.upload(sent['lora'])} if agg is not None else sent

    def download(trainable):
        if fed.keep_local or fed.pooled:
            return {}
        sent = shared_of(trainable)  # FFA-LoRA's frozen A is known to clients from its seed
        return {**sent, 'lora': agg.upload(sent['lora'])} if agg is not None else sent

    def effective_frozen(state, frozen):
        if not with_delta:
            return frozen
        params = lora_aggregation.apply_delta(frozen['params'], state.aux['delta'])
        return {**frozen, 'params': params}

    def init(trainable: PyTree, rng: jax.Array) -> ServerState:
        if fed.keep_local or fed.personal_lambda > 0:
            kept = client_state.tile(trainable, fed.num_clients)
        elif local:
            kept = client_state.tile(client_state.split(trainable, local)[1], fed.num_clients)
        else:
            kept = {}
        aux = dict(fed.aux_init(trainable))
        if with_delta:
            aux['delta'] = agg.init(trainable['lora'])['delta']
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state=fed.server_tx.init(trainable) if fed.server_tx else {},
                           rng=rng,
                           clients=kept,
                           aux=aux)

    def centralized(state, frozen, data):
        key, hp = jax.random.fold_in(state.rng, state.round), data.hparams
        pooled = pool_round(data.batches, jax.random.fold_in(key, 0))
        res = update(frozen,
                     state.trainable,
                     pooled,
                     jax.random.fold_in(key, 1),
                     hp=hparams.client(hp, proximal=False))
        new = server_step(state, res.delta, fed.server_tx, hparams.server(hp))
        sampled = (data.n_k > 0).astype(jnp.float32)
        finite = all_finite(jax.tree.map(lambda x: x[None], res.delta), 1)[0]
        return new.replace(round=state.round + 1), {
            'train_loss': res.loss_sum / jnp.maximum(res.weight, 1.0),
            'delta_norm': optax.global_norm(res.delta),
            'clients_sampled': sampled.sum(),
            'clients_reported': sampled.sum(),
            'clients_used': jnp.where(finite, sampled.sum(), 0.0),
            'clients_nonfinite': jnp.where(finite, 0.0, sampled.sum()),
            'nonfinite_ids': jnp.full_like(data.client_ids, -1),
            'live': sampled
        }

    def starts(state, ids, rank_mask):
        """Per-client starting trees [C, ...], or None when every client starts at w_G."""
        c = ids.shape[0]
        if fed.keep_local:
            return client_state.gather(state.clients, ids)
        if local:
            return client_state.join(client_state.tile(shared_of(state.trainable), c),
                                     client_state.gather(state.clients, ids))
        if rank_mask is not None:
            tiled = client_state.tile(state.trainable, c)
            return {**tiled, 'lora': lora_ranks.mask_adapters(tiled['lora'], rank_mask)}
        return None

    def server_update(state, sent, weights, rank_mask, info, lr_scale):
        """(new state, metrics) from the live clients' uploads [C, ...] and weights [C]."""
        key, g = stream_key(state, SERVER_STREAM), state.trainable
        metrics = {}
        if agg is not None:
            clients = lora_aggregation.client_adapters(g['lora'], sent['lora'])
            delta_state, new_lora, metrics = agg.aggregate({'delta': state.aux.get('delta', {})},
                                                           g['lora'], clients, weights, rank_mask,
                                                           key)
            aux = {**state.aux, 'delta': delta_state['delta']} if with_delta else state.aux
            if sets_global:  # the method builds the global adapter itself (sgd(1.0) enforced)
                return state.replace(trainable={**g, 'lora': new_lora}, aux=aux), metrics
            avg = {
                **jax.tree.map(jnp.zeros_like, g), 'lora':
                jax.tree.map(jnp.subtract, new_lora, g['lora'])
            }
            return server_step(state.replace(aux=aux), avg, fed.server_tx, lr_scale), metrics
        if 'lora' in sent and 'lora' in g and not local and lora_aggregation.has_modules(g['lora']):
            clients = lora_aggregation.client_adapters(g['lora'], sent['lora'])
            err = lora_aggregation.aggregation_error(clients, clients, weights)
            metrics = {'lora_agg_error': err.total, 'lora_agg_error_mean': err.mean}
        avg, aux, extra = fed.reducer(sent, weights, key, state.aux, info)
        if local:  # the kept leaves get a zero pseudo-gradient: the global copy stays put
            avg = client_state.join(avg,
                                    jax.tree.map(jnp.zeros_like,
                                                 client_state.split(g, local)[1]))
        new = server_step(state, avg, fed.server_tx, lr_scale)
        return new.replace(aux=aux), {**metrics, **extra}

    def apply(state: ServerState, frozen: PyTree, data: RoundData):
        if fed.pooled:
            return centralized(state, frozen, data)
        ids, hp = data.client_ids, data.hparams
        frozen = effective_frozen(state, frozen)
        rates = faults.rates() if data.rates is None else data.rates
        fate = fates.draw(stream_key(state, FATE_STREAM), ids, rates)
        data = data.replace(mask=fates.apply_steps(data.mask, fate.step_frac))
        r_max = lora_ranks.adapter_rank(state.trainable['lora']) if ranks is not None else 0
        rank_mask = None if ranks is None else lora_ranks.rank_mask(ranks[ids], r_max)
        res = run_clients(functools.partial(update, hp=hparams.client(hp)),
                          state,
                          frozen,
                          data,
                          fed.chunk,
                          start=starts(state, ids, rank_mask),
                          mesh=mesh,
                          anchor_is_start=rank_mask is not None)
        sent = upload(res.delta)
        if faults.attack != 'none':
            bad = attacks.attacker_mask(ids, fed.num_clients, faults.attack_fraction,
                                        faults.attack_seed)
            sent = attacks.apply(faults.attack, sent, bad, stream_key(state, ATTACK_STREAM),
                                 faults.attack_scale, faults.attack_noise_norm)
        c = ids.shape[0]
        kept = {} if not (fed.keep_local or local) else (
            res.delta if fed.keep_local else client_state.split(res.delta, local)[1])
        finite = (all_finite(sent, c) & all_finite(kept, c)).astype(jnp.float32)
        metrics = round_metrics(res, ids, data.n_k, fate.report, finite)
        live = fate.report * finite * (data.n_k > 0)  # this client's work counts this round
        metrics['live'] = live
        new = state
        if fed.keep_local:
            new = new.replace(
                clients=client_state.scatter_add(state.clients, ids, zero_where(res.delta, live)))
        else:
            info = {'ids': ids, 'sampled': (data.n_k > 0).astype(jnp.float32), 'live': live}
            new, extra = server_update(state, zero_where(sent, live), data.n_k * live, rank_mask,
                                       info, hparams.server(hp))
            metrics.update(extra)
            if local:
                new = new.replace(
                    clients=client_state.scatter_add(state.clients, ids, zero_where(kept, live)))
        if personal_update is not None:
            # Ditto: personal steps draw their own keys; their anchor is the pre-round w_G^t.
            p = run_clients(functools.partial(personal_update,
                                              hp=hparams.client(hp, proximal=False)),
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
    return Algorithm(init, apply, upload, download, personal if has_personal else None,
                     effective_frozen)
