"""fedgen's base types: the server state every method carries and the algorithm interface.

An algorithm is a pair of pure functions over explicit state plus the two views that define its
communication (what one client sends up, what the server sends down):

    state          = init(trainable, rng)
    state, metrics = apply(state, frozen, round_data)        (one jitted program per round)
    sent_up        = upload(delta_k)       the tree client k uploads for its update delta_k
    sent_down      = download(trainable)   the tree the server broadcasts to each sampled client
    personal       = personal(state)       every client's own trainable tree [N, ...], or None
    frozen_k       = effective_frozen(state, frozen)   the frozen tree the model runs with (the
                     backbone plus any server-side frozen delta, e.g. FedEx-LoRA's residual)
    out            = client_phase(state, frozen, round_data)   the clients' half of a round
    state, metrics = server_phase(state, round_data, out)      the server's half
                     (apply = server_phase . client_phase; deployment runs them apart)

``trainable`` and ``frozen`` are separate pytrees of linen collections: the model sees
``{**frozen, **trainable}``; only ``trainable`` is differentiated, optimised, averaged, sent and
checkpointed. Every method (FedGen-Edge included) is a small module of fedgen/algorithms over the
shared primitives of fedgen/fl/engine.py, so all of them share this interface.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class ServerState:
    """The whole state of a federated run (what a checkpoint holds).

    round: [] int32, rounds done; trainable: the global trainable collections (e.g.
    {'lora': A_G}); opt_state: the server optimizer's state; rng: the run's base key [2];
    clients: per-client persistent trees stacked [N, ...] for methods that keep them (Ditto's
    personal adapters, FedSA's local B blocks, local-only adapters), {} otherwise;
    aux: server-side state of the aggregation (e.g. an adaptive clip norm), {} when unused;
    with ``fed.ema_decay > 0`` also aux['ema'], the EMA of ``trainable`` (:func:`with_ema`).
    """
    round: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array
    clients: PyTree = struct.field(default_factory=dict)
    aux: PyTree = struct.field(default_factory=dict)


class Algorithm(NamedTuple):
    """init(trainable, rng) -> ServerState; apply(state, frozen, RoundData) -> (state, metrics);
    upload(delta) / download(trainable) -> the trees actually sent (byte accounting);
    personal(state) -> stacked [N, ...] personal trees, or None when the method keeps none;
    effective_frozen(state, frozen) -> the frozen tree to evaluate and fine-tune with;
    client_phase / server_phase: the two halves of apply (None for methods with no server side);
    aggregator: the fedgen.aggregators.Aggregator the server uses (None: it aggregates nothing);
    has_global: whether the method trains a global model (FedSA and local-only do not)."""
    init: Callable
    apply: Callable
    upload: Callable
    download: Callable
    personal: Optional[Callable] = None
    effective_frozen: Callable = lambda state, frozen: frozen
    client_phase: Optional[Callable] = None
    server_phase: Optional[Callable] = None
    aggregator: Any = None
    has_global: bool = True


EMA_KEY = 'ema'  # state.aux[EMA_KEY]: the server's EMA of the global trainable tree


def check_ema_decay(decay, *, section: str = '') -> None:
    """One-line ValueError (naming ``ema_decay``) unless ``decay`` is a number in [0, 1).

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f'{section}ema_decay must be a number in [0, 1), got {decay!r}')


def ema_decay_at(decay: float, rnd: jax.Array) -> jax.Array:
    """The decay used after round ``rnd`` (0-based rounds done before it), with a warm-up:

        d_t = min(decay, (1 + t) / (10 + t)),

    so the first rounds are not dominated by the initial tree (d_0 = 0.1, d_9 ~ 0.53, d_90 = 0.91)
    while a long run uses ``decay`` itself (TF's ExponentialMovingAverage num_updates rule; it
    stands in for Adam-style bias correction, which would need a zero-initialised average)."""
    t = jnp.asarray(rnd, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_update(ema: PyTree, trainable: PyTree, d: jax.Array) -> PyTree:
    """ema <- d * ema + (1 - d) * trainable, leaf by leaf (dtype of ``ema`` kept)."""
    return jax.tree.map(lambda e, w: (d * e + (1.0 - d) * w).astype(e.dtype), ema, trainable)


def with_ema(alg: Algorithm, decay: float, *, section: str = '') -> Algorithm:
    """``alg`` plus a server-side EMA of the global trainable tree, in ``state.aux['ema']``.

    After every round t (t = rounds done before it, w_G^{t+1} the new global tree):

        ema^{t+1} = d_t ema^t + (1 - d_t) w_G^{t+1},   ema^0 = w_G^0,   d_t = ema_decay_at(decay, t)

    The EMA is part of the ServerState (aux), so checkpoints hold it and a resumed run equals an
    unbroken one. It never reaches a client: upload/download/personal are ``alg``'s, and the inner
    method sees its own aux without the entry. ``decay`` (config ``fed.ema_decay``) must be in
    [0, 1); 0 returns ``alg`` unchanged (no aux entry, bit-identical runs and checkpoints).
    Refused (one line) for methods without a global model and for aggregators that re-base the
    global adapter every round (FlexLoRA's SVD, FLoRA's re-drawn A) or keep a frozen delta
    (FedEx-LoRA): an average of their A and B leaves describes no model that ever existed.
    Errors name ema_decay and algorithm; section: the caller's prefix for those names, e.g.
    'fed.'.
    """
    check_ema_decay(decay, section=section)
    if decay == 0:
        return alg
    agg = alg.aggregator
    if not alg.has_global:
        raise ValueError(f"{section}ema_decay cannot run with {section}algorithm='fedsa' or "
                         "'local_only': the method has no global model to average")
    if agg is not None and (agg.sets_global or agg.frozen_delta is not None):
        raise ValueError(
            f'{section}ema_decay cannot run with {agg.label}: it re-bases A and B '
            'every round, so an EMA of them is no model that existed; use avg_ab or ffa')

    def init(trainable, rng):
        state = alg.init(trainable, rng)
        return state.replace(aux={**state.aux, EMA_KEY: jax.tree.map(jnp.array, trainable)})

    def around(step):

        def wrapped(state, *args):
            aux = dict(state.aux)
            ema = aux.pop(EMA_KEY)
            new, metrics = step(state.replace(aux=aux), *args)
            ema = ema_update(ema, new.trainable, ema_decay_at(decay, state.round))
            return new.replace(aux={**new.aux, EMA_KEY: ema}), metrics

        return wrapped

    def client_phase(state, frozen, data):
        return alg.client_phase(state.replace(aux=_without_ema(state.aux)), frozen, data)

    def effective_frozen(state, frozen):
        return alg.effective_frozen(state.replace(aux=_without_ema(state.aux)), frozen)

    phases = {}
    if alg.server_phase is not None:
        phases = dict(client_phase=client_phase, server_phase=around(alg.server_phase))
    return alg._replace(init=init,
                        apply=around(alg.apply),
                        effective_frozen=effective_frozen,
                        **phases)


def _without_ema(aux: PyTree) -> PyTree:
    return {k: v for k, v in aux.items() if k != EMA_KEY}


def ema_of(state: ServerState) -> Optional[PyTree]:
    """The EMA of the global trainable tree kept by :func:`with_ema`, or None without one."""
    return state.aux.get(EMA_KEY) if isinstance(state.aux, dict) else None
