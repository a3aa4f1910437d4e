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
from flax import struct

PyTree = Any


@struct.dataclass
class ServerState:
    """The whole state of a federated run (what a checkpoint holds).

    round: [] int32, rounds done; trainable: the global trainable collections (e.g.
    {'lora': A_G}); opt_state: the server optimizer's state; rng: the run's base key [2];
    clients: per-client persistent trees stacked [N, ...] for methods that keep them (Ditto's
    personal adapters, FedSA's local B blocks, local-only adapters), {} otherwise;
    aux: server-side state of the aggregation (e.g. an adaptive clip norm), {} when unused.
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
