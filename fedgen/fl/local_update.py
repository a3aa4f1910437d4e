"""ONE client's local training, written once and mapped over the population.

The client starts from the broadcast trainable tree w_G and runs S optimizer steps as a
``lax.scan``; step s uses batch s and is a no-op when mask[s] = 0 (parameters and optimizer
state are carried through unchanged; a scalar ``lax.cond`` skips the step's compute). With a
proximal weight mu > 0 the objective is FedProx's

    L_k(w) + (mu / 2) ||w - w_anchor||^2,

where the anchor defaults to w_G (Ditto uses the same term with its own lambda). Frozen and
trainable variables are separate pytrees of linen collections; the model sees {**frozen, **w}.

Traced hyper-parameters (``hp``, fedgen/fl/hparams.py): the step's update scaled (a learning rate
multiple) and the proximal weight mu as a traced scalar instead of the compile-time ``prox_mu``.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedgen.fl import hparams

PyTree = Any


class LocalResult(NamedTuple):
    """delta = w_local - w_start; final params and optimizer state; loss sums over valid steps."""
    delta: PyTree
    params: PyTree
    opt_state: PyTree
    loss_sum: jax.Array
    weight: jax.Array


def proximal(params: PyTree, anchor: PyTree, mu: float) -> jax.Array:
    """(mu / 2) sum ||w - w_anchor||^2 over all leaves."""
    sq = jax.tree.map(lambda w, a: jnp.sum(jnp.square(w - a)), params, anchor)
    return 0.5 * mu * sum(jax.tree.leaves(sq))


def make_local_update(loss_fn: Callable,
                      tx: optax.GradientTransformation,
                      prox_mu: float = 0.0) -> Callable:
    """Returns update(frozen, w_start, data, rng, anchor=None, opt_state=None, hp=None) ->
    LocalResult.

    data = {'batches': field -> [S, B, ...], 'mask': [S]}; rng is this client's key, split per step.
    Gradients flow only into w (the trainable tree); ``frozen`` is read-only. The optimizer starts
    fresh (tx.init) unless ``opt_state`` is given (central pre-training continues it). ``hp``:
    None (the compile-time values), or (lr_scale, mu): traced [] scalars, the step's update scaled
    by lr_scale and, unless mu is None, the proximal weight mu in place of ``prox_mu``.
    """

    def objective(w, frozen, batch, key, anchor, mu):
        loss, weight = loss_fn({**frozen, **w}, batch, key)
        if mu is not None:
            reg = proximal(w, anchor, mu)
        else:
            reg = proximal(w, anchor, prox_mu) if prox_mu > 0 else 0.0
        return loss + reg, (loss, weight)

    grad_fn = jax.grad(objective, has_aux=True)

    def update(frozen, w_start, data, rng, anchor=None, opt_state=None, hp=None):
        anchor = w_start if anchor is None else anchor
        opt_state = tx.init(w_start) if opt_state is None else opt_state
        steps = data['mask'].shape[0]
        lr_scale, mu = (None, None) if hp is None else hp

        def live(carry, batch, m, key):
            w, opt_state = carry
            grads, (loss, weight) = grad_fn(w, frozen, batch, key, anchor, mu)
            updates, new_opt = tx.update(grads, opt_state, w)
            updates = hparams.scale(updates, lr_scale)
            return (optax.apply_updates(w, updates), new_opt), (loss * weight * m, weight * m)

        def step(carry, xs):
            batch, m, key = xs
            # A padded step (mask 0) changes nothing, so it is skipped by a scalar cond rather
            # than computed and discarded (under vmap the cond is a select: both branches run).
            out = jax.eval_shape(live, carry, batch, m, key)[1]
            pad = lambda: (carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out))
            return jax.lax.cond(m > 0, lambda: live(carry, batch, m, key), pad)

        xs = (data['batches'], data['mask'], jax.random.split(rng, steps))
        (w, opt_state), (losses, weights) = jax.lax.scan(step, (w_start, opt_state), xs)
        delta = jax.tree.map(jnp.subtract, w, w_start)
        return LocalResult(delta, w, opt_state, losses.sum(), weights.sum())

    return update
