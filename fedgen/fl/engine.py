"""The primitives every federated algorithm shares (fedgen/algorithms/ composes them).

One round t over the sampled clients k = 1..C (padding clients have n_k = 0 and masked steps):

    client phase   start_k = download(w_G^t) (+ client k's kept leaves)
                   w_k     = LocalUpdate_k(start_k)                   (run_clients, mapped)
                   u_k     = upload(w_k - start_k)                    (what client k sends)
    server phase   Delta   = aggregator({u_k}, weights_k)             (fedgen.aggregators)
                   w_G^t+1 = ServerOpt(w_G^t, g = -Delta)             (sgd(1.0) = FedAvg)

The two phases are separate functions (``client_phase`` / ``server_phase`` of an Algorithm), so
the same code runs as one compiled round in simulation and split over processes in deployment.

Who counts. A sampled client k with n_k > 0 either reports (fate report_k = 1) or drops after the
download; a straggler's step mask keeps only its first ceil(f_k S_k) real steps. An upload with a
NaN or inf anywhere gets weight 0 (and is zeroed, since 0 * NaN = NaN). The weights are

    used_k = n_k * report_k * finite_k.

A round in which no client is used keeps the global model (also the server optimizer's state);
under DP it is still a noise-only, accounted update. Client keys are fold_in(fold_in(rng, round),
client id), so results do not depend on chunking, device count or client order.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from fedgen.fl import attacks
from fedgen.fl import local_update as client
from fedgen.fl import fates
from fedgen.fl import hparams
from fedgen.fl import mesh as population
from fedgen.aggregators import robust
from fedgen.aggregators import Aggregator, RoundContext, zero_like_upload
from fedgen.fl.algorithm import ServerState
from fedgen.data.batching import RoundData

PyTree = Any
# Key streams besides the clients' fold_in(fold_in(rng, round), id): fold_in(fold_in(rng, STREAM),
# round), with STREAM far above any round number, so no stream ever meets a client's key.
SERVER_STREAM = 2**30 + 1
FATE_STREAM = 2**30 + 2
ATTACK_STREAM = 2**30 + 3
# Round metrics computed from raw client updates: outside epsilon under DP (see ``publish``).
RAW_METRICS = ('train_loss', 'delta_norm', 'clients_reported', 'clients_used', 'clients_nonfinite',
               'nonfinite_ids', 'personal_train_loss')


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


@struct.dataclass
class ClientOutput:
    """The clients' side of a round, rows [C, ...] in the round's client order.

    sent: the uploads (after simulated attacks); kept: updates of per-client persistent trees
    that never leave the client ({} when none); loss_sum, weight [C]: local loss sums and their
    weights; report [C]: 1 when the upload arrives (fates); finite [C]: 1 when sent and kept are
    finite; extra: method-specific [C] values (Ditto's personal losses)."""
    sent: PyTree
    kept: PyTree
    loss_sum: jax.Array
    weight: jax.Array
    report: jax.Array
    finite: jax.Array
    norm: jax.Array
    extra: PyTree = struct.field(default_factory=dict)


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
                anchor_is_start: bool = False,
                active: jax.Array | None = None) -> client.LocalResult:
    """Maps ``local_update`` over the round's clients; results are stacked [C, ...].

    ``start``: per-client starting trees [C, ...] (default: the global tree, broadcast); the
    proximal anchor is the global tree w_G^t, or each client's own start (``anchor_is_start``:
    its rank-masked copy of w_G^t). ``mesh`` shards the client axis over devices (C must be a
    multiple of its size). ``active`` [C]: the clients whose work can count (sampled and
    reporting); chunks with none are skipped (population.map_clients), the rest are unchanged."""
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

    return population.map_clients(one, (frozen, state.trainable),
                                  per_client,
                                  chunk,
                                  mesh=mesh,
                                  active=active)


def draw_fates(state: ServerState, data: RoundData, faults: Faults) -> tuple:
    """(data with stragglers' step masks cut, fates.Fate): drawn from the fate stream per id."""
    rates = faults.rates() if data.rates is None else data.rates
    fate = fates.draw(stream_key(state, FATE_STREAM), data.client_ids, rates)
    return data.replace(mask=fates.apply_steps(data.mask, fate.step_frac)), fate


def attack(state: ServerState, sent: PyTree, ids: jax.Array, faults: Faults,
           num_clients: int) -> PyTree:
    """The uploads after the simulated attackers among ``ids`` replaced theirs (no-op without)."""
    if faults.attack == 'none':
        return sent
    bad = attacks.attacker_mask(ids, num_clients, faults.attack_fraction, faults.attack_seed)
    return attacks.apply(faults.attack, sent, bad, stream_key(state, ATTACK_STREAM),
                         faults.attack_scale, faults.attack_noise_norm)


def server_step(state: ServerState,
                avg_delta: PyTree,
                server_tx: optax.GradientTransformation,
                lr_scale=None) -> ServerState:
    """w_G <- w_G + s ServerOpt(-avg_delta): the server optimizer sees the pseudo-gradient; s is
    a traced learning-rate multiple (fedgen/fl/hparams.py), None for 1."""
    neg = jax.tree.map(jnp.negative, avg_delta)
    updates, opt_state = server_tx.update(neg, state.opt_state, state.trainable)
    updates = hparams.scale(updates, lr_scale)
    return state.replace(trainable=optax.apply_updates(state.trainable, updates),
                         opt_state=opt_state)


def select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """new where the scalar ``pred`` holds, else old, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def aggregate_and_step(state: ServerState, agg: Aggregator, sent: PyTree, weights: jax.Array,
                       ctx: RoundContext, server_tx: optax.GradientTransformation,
                       lr_scale) -> tuple[ServerState, dict]:
    """The server phase's core: Delta from ``agg`` (its state in aux['agg']), then the server
    step; leaves the clients do not send get a zero pseudo-update. Without any used client the
    global tree, optimizer and aggregator states are kept, unless ``agg`` is private (a
    noise-only update is a valid, accounted round)."""
    key = stream_key(state, SERVER_STREAM)
    delta, agg_state, metrics = agg.aggregate(sent, weights, state.aux['agg'], key, ctx)
    if agg.sets_global:  # the aggregator returned the next global tree itself
        new = state.replace(trainable={**state.trainable, **delta})
    else:
        new = server_step(state, zero_like_upload(delta, state.trainable), server_tx, lr_scale)
    new = new.replace(aux={**state.aux, 'agg': agg_state})
    if not agg.private:
        new = select(weights.sum() > 0, new, state)
    return new, metrics


def round_metrics(out: ClientOutput, ids: jax.Array, n_k: jax.Array, live: jax.Array) -> dict:
    """train_loss: loss sums / loss weight over the clients used (a diverged, excluded client
    cannot make it NaN); delta_norm: mean update norm over the clients used; counts of clients
    sampled / reported / used / non-finite; nonfinite_ids [C] (the id where the upload was
    non-finite, else -1)."""
    sampled = (n_k > 0).astype(jnp.float32)
    reported = sampled * out.report
    used = live
    bad = reported * (1.0 - out.finite)
    loss = jnp.where(used > 0, out.loss_sum, 0.0).sum()
    return {
        'train_loss': loss / jnp.maximum((out.weight * used).sum(), 1.0),
        'delta_norm': jnp.where(used > 0, out.norm, 0.0).sum() / jnp.maximum(used.sum(), 1.0),
        'clients_sampled': sampled.sum(),
        'clients_reported': reported.sum(),
        'clients_used': used.sum(),
        'clients_nonfinite': bad.sum(),
        'nonfinite_ids': jnp.where(bad > 0, ids, -1)
    }


def publish(metrics: dict, agg: Aggregator, log_diagnostics: bool) -> dict:
    """The metrics a round may publish: under a private aggregator only what epsilon covers (the
    noised aggregate's statistics and the sampled count), unless ``log_diagnostics``. 'live' [C]
    stays: the trainer uses it for byte accounting and never writes it."""
    if not agg.private or log_diagnostics:
        return metrics
    drop = set(RAW_METRICS) | set(agg.diagnostics)
    return {k: v for k, v in metrics.items() if k not in drop}


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
