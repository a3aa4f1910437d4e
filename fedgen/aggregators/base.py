"""Server aggregation as one typed value, composed like optax transformations.

An :class:`Aggregator` turns the round's stacked client uploads into the global pseudo-update:

    state                    = init(global_tree)
    delta, state, metrics    = aggregate(updates, weights, state, key, ctx)

updates: pytree of [C, ...] (what each client sent, rows of absent clients zeroed);
weights: [C] (n_k for a present client whose upload arrived and is finite, else 0);
ctx: :class:`RoundContext` (ids, who was sampled, who arrived, the global tree, rank masks);
delta: one tree like a single client's upload, the update the server optimizer applies as
w_G <- w_G + ServerOpt(delta) (FedAvg: delta = sum_k w_k u_k / sum_k w_k).

Traits say how an aggregator composes, so that a combination that cannot be defined is refused
when it is built (one ``ValueError`` naming both config fields), never silently ignored:

- ``individual``: it reads the individual updates beyond their sum (robust reductions, the
  LoRA products of FedEx / FlexLoRA / FLoRA): refused under secure aggregation and DP.
- ``private``: it adds calibrated Gaussian noise; the privacy accountant covers its output, and
  only the metrics it lists outside ``diagnostics`` are covered by epsilon.
- ``sets_global``: it constructs the next global adapter itself and returns that tree in place
  of ``delta``; the server step must be sgd(1.0) (any other optimizer would break the product it
  builds) and no EMA can average it (A and B are re-based every round).
- ``frozen_delta(state)``: a server-side frozen delta dW on the backbone's kernels (FedEx-LoRA's
  residual, FLoRA's folded stack), or None; every client and evaluation runs on W0 + dW.
- ``client_frozen``: adapter leaves the clients must not train (FFA-LoRA's A).
- ``ranks``: it knows heterogeneous LoRA ranks (reads ctx.rank_mask): required with them.
- ``upload(tree)``: the part of a client's update that is sent (FFA-LoRA: B only).
- ``label``: the config setting this aggregator stands for (e.g. ``fed.aggregator='median'``),
  set by whoever builds it, so refusals name the user's own fields.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from fedgen.privacy import dp as dp_lib

PyTree = Any


@struct.dataclass
class RoundContext:
    """What the server knows about a round besides the uploads.

    ids [C] client ids; sampled [C] 1 where a sampled client took part (n_k > 0); live [C] 1
    where its upload arrived and is finite; global_tree: the global trainable tree w_G^t (the
    whole tree, not only what is sent); rank_mask [C, r_max] (heterogeneous LoRA ranks) or None.
    """
    ids: jax.Array
    sampled: jax.Array
    live: jax.Array
    global_tree: PyTree
    rank_mask: Optional[jax.Array] = None


def _identity(tree):
    return tree


class Aggregator(NamedTuple):
    """init(global_tree) -> state; aggregate(updates, weights, state, key, ctx) -> (delta, state,
    metrics); the traits are documented in the module docstring."""
    init: Callable
    aggregate: Callable
    label: str
    individual: bool = False
    private: bool = False
    sets_global: bool = False
    frozen_delta: Optional[Callable] = None
    client_frozen: tuple = ()
    ranks: bool = False
    upload: Callable = _identity
    diagnostics: tuple = ()

    def named(self, label: str) -> 'Aggregator':
        """The same aggregator, labelled with the config setting it stands for."""
        return self._replace(label=label)


def refuse(outer: str, inner: str, why: str) -> None:
    """The one-line refusal of a combination: ValueError('<outer> cannot run with <inner>: why')."""
    raise ValueError(f'{outer} cannot run with {inner}: {why}')


def zero_like_upload(delta: PyTree, template: PyTree) -> PyTree:
    """``template``'s structure with ``delta``'s leaves where it has them and zeros elsewhere
    (the pseudo-update of leaves a client does not send, e.g. FFA-LoRA's frozen A)."""
    flat_d = traverse_util.flatten_dict(delta) if delta else {}
    flat_t = traverse_util.flatten_dict(template)
    return traverse_util.unflatten_dict({
        p: flat_d[p] if p in flat_d else jnp.zeros_like(v)
        for p, v in flat_t.items()
    })


class ClientTransform(NamedTuple):
    """A per-client map applied before the reduction: (updates [C, ...], state, ctx) ->
    (updates, state, metrics). E.g. :func:`clip_to`."""
    init: Callable
    apply: Callable
    label: str


def clip_to(bound: float, label: str = 'clip') -> ClientTransform:
    """u_k <- u_k min(1, S / ||u_k||) with ||.|| the global L2 norm of client k's whole upload and
    S = ``bound`` (> 0). Without noise this is norm bounding, not privacy."""
    if not bound > 0:
        raise ValueError(f'{label} must be > 0, got {bound!r}')

    def apply(updates, state, ctx):
        clipped, norms = dp_lib.clip(updates, bound)
        live = ctx.live.astype(jnp.float32)
        frac = (live * (norms > bound)).sum() / jnp.maximum(live.sum(), 1.0)
        return clipped, state, {'clipped_frac': frac}

    return ClientTransform(lambda tree: (), apply, label)


def chain(*transforms: ClientTransform, reduction: Aggregator) -> Aggregator:
    """``reduction`` applied to the updates after every client transform, in order (optax's
    ``chain`` for the server side). The state is (transform states..., reduction state)."""

    def init(tree):
        return tuple(t.init(tree) for t in transforms) + (reduction.init(tree), )

    def aggregate(updates, weights, state, key, ctx):
        states, metrics = [], {}
        for t, s in zip(transforms, state[:-1]):
            updates, s, m = t.apply(updates, s, ctx)
            states.append(s)
            metrics.update(m)
        delta, s, m = reduction.aggregate(updates, weights, state[-1], key, ctx)
        return delta, tuple(states) + (s, ), {**metrics, **m}

    label = ' + '.join([t.label for t in transforms] + [reduction.label])
    inner_delta = reduction.frozen_delta
    frozen_delta = None if inner_delta is None else (lambda state: inner_delta(state[-1]))
    return reduction._replace(init=init,
                              aggregate=aggregate,
                              label=label,
                              frozen_delta=frozen_delta)
