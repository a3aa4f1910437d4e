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

``trainable`` and ``frozen`` are separate pytrees of linen collections: the model sees
``{**frozen, **trainable}``; only ``trainable`` is differentiated, optimised, averaged, sent and
checkpointed. Every method (FedGen-Edge included) is :func:`fedgen.engine.make` with typed
hyper-parameters, so all of them share this interface.
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
    effective_frozen(state, frozen) -> the frozen tree to evaluate and fine-tune with."""
    init: Callable
    apply: Callable
    upload: Callable
    download: Callable
    personal: Optional[Callable] = None
    effective_frozen: Callable = lambda state, frozen: frozen


EMA_KEY = 'ema'  # state.aux[EMA_KEY]: the server's EMA of the global trainable tree


def check_ema_decay(decay) -> None:
    """One-line ValueError unless ``decay`` (config ``fed.ema_decay``) is a number in [0, 1)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f'fed.ema_decay must be a number in [0, 1), got {decay!r}')


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


def with_ema(alg: Algorithm, decay: float) -> Algorithm:
    """``alg`` plus a server-side EMA of the global trainable tree, in ``state.aux['ema']``.

    After every round t (t = rounds done before it, w_G^{t+1} the new global tree):

        ema^{t+1} = d_t ema^t + (1 - d_t) w_G^{t+1},   ema^0 = w_G^0,   d_t = ema_decay_at(decay, t)

    The EMA is part of the ServerState (aux), so checkpoints hold it and a resumed run equals an
    unbroken one. It never reaches a client: upload/download/personal are ``alg``'s, and the inner
    method sees its own aux without the entry. ``decay`` (config ``fed.ema_decay``) must be in
    [0, 1); 0 returns ``alg`` unchanged (no aux entry, bit-identical runs and checkpoints).
    """
    check_ema_decay(decay)
    if decay == 0:
        return alg

    def init(trainable, rng):
        state = alg.init(trainable, rng)
        return state.replace(aux={**state.aux, EMA_KEY: jax.tree.map(jnp.array, trainable)})

    def apply(state, frozen, data):
        aux = dict(state.aux)
        ema = aux.pop(EMA_KEY)
        new, metrics = alg.apply(state.replace(aux=aux), frozen, data)
        ema = ema_update(ema, new.trainable, ema_decay_at(decay, state.round))
        return new.replace(aux={**new.aux, EMA_KEY: ema}), metrics

    def effective_frozen(state, frozen):
        return alg.effective_frozen(state.replace(aux=_without_ema(state.aux)), frozen)

    return alg._replace(init=init, apply=apply, effective_frozen=effective_frozen)


def _without_ema(aux: PyTree) -> PyTree:
    return {k: v for k, v in aux.items() if k != EMA_KEY}


def ema_of(state: ServerState) -> Optional[PyTree]:
    """The EMA of the global trainable tree kept by :func:`with_ema`, or None without one."""
    return state.aux.get(EMA_KEY) if isinstance(state.aux, dict) else None
