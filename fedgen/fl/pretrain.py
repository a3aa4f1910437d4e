"""Central pre-training of the backbone on the server's public portion, before it is frozen.

The public portion is disjoint from every client's data (the task says which portion). Training is
the same single-client update as federated clients run (``client.make_local_update`` with every
leaf trainable), in jitted segments of a fixed number of steps so it compiles once and can report
progress; the optimizer state carries across segments. A backbone is identified by the hash of its
*recipe* (model, pre-training settings, public-data spec, seed), which keys its cache.

With ``ema_decay`` d > 0 the backbone is the exponential moving average of the weights over the
steps (DDPM's sampling weights), kept inside the optimizer state (:func:`with_param_ema`):

    ema_0 = w_0,   ema_{s+1} = d_s ema_s + (1 - d_s) w_{s+1},   d_s = min(d, (1 + s) / (10 + s)),

the warm-up of the server EMA (fedgen.fl.algorithm.ema_decay_at); the training steps themselves
are unchanged.
"""
import hashlib
import json
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen.fl import local_update as client
from fedgen.fl.algorithm import check_ema_decay, ema_decay_at, ema_update

PyTree = Any


def recipe_hash(recipe: dict) -> str:
    """sha256 (first 16 hex digits) of the recipe's canonical JSON."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def step_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, B] example indices: consecutive seeded permutations of range(n) (epochs)."""
    if n < 1:
        raise ValueError('pretrain: the public portion is empty (n = 0 examples)')
    rng = np.random.default_rng([seed, 0x9E])
    need = steps * batch_size
    perms = [rng.permutation(n) for _ in range(-(-need // n))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size)


class EmaState(NamedTuple):
    """inner: the wrapped optimizer's state; ema: the averaged parameters (a tree like them);
    count: the steps taken (int32 scalar)."""
    inner: optax.OptState
    ema: PyTree
    count: jax.Array


def with_param_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """``tx`` with an EMA of the parameters in its state (module docstring's equation): after each
    step, ``state.ema`` <- d_s ema + (1 - d_s) (params + updates). The updates are ``tx``'s,
    unchanged. decay must be in [0, 1)."""
    check_ema_decay(decay)

    def init(params):
        return EmaState(tx.init(params), jax.tree.map(jnp.asarray, params), jnp.zeros((),
                                                                                      jnp.int32))

    def update(updates, state, params):
        updates, inner = tx.update(updates, state.inner, params)
        ema = ema_update(state.ema, optax.apply_updates(params, updates),
                         ema_decay_at(decay, state.count))
        return updates, EmaState(inner, ema, state.count + 1)

    return optax.GradientTransformation(init, update)


def train(loss_fn: Callable,
          tx: optax.GradientTransformation,
          params: PyTree,
          examples: dict,
          steps: int,
          batch_size: int,
          seed: int,
          segment: int = 100,
          ema_decay: float = 0.0) -> Iterator[tuple]:
    """Yields (steps_done, mean_train_loss_of_segment, params) after every segment of steps;
    params are the weights' EMA when ``ema_decay`` > 0 (module docstring), else the weights.

    examples: field -> [N, ...]; the final partial segment is padded with masked (no-op) steps
    (they leave the weights, the optimizer state and the EMA as they were).
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f'steps must be an int >= 0, got {steps!r}')
    check_ema_decay(ema_decay)
    if ema_decay:
        tx = with_param_ema(tx, ema_decay)
    update = client.make_local_update(loss_fn, tx)
    segment = max(1, min(segment, steps))

    @jax.jit
    def run(w, opt_state, data, rng):
        res = update({}, w, data, rng, opt_state=opt_state)
        return res.params, res.opt_state, res.loss_sum / jnp.maximum(res.weight, 1.0)

    n = len(next(iter(examples.values())))
    idx = step_indices(n, max(steps, 1), batch_size, seed)
    w, opt_state = {'params': params}, tx.init({'params': params})
    key = jax.random.PRNGKey(seed)
    for start in range(0, steps, segment):
        sl = np.arange(start, start + segment)
        valid = sl < steps
        seg_idx = idx[np.minimum(sl, steps - 1)]
        batch = {k: v[seg_idx] for k, v in examples.items()}
        batch['weight'] = np.ones(seg_idx.shape, np.float32)
        data = {'batches': batch, 'mask': valid.astype(np.float32)}
        w, opt_state, loss = run(w, opt_state, data, jax.random.fold_in(key, start))
        out = opt_state.ema if ema_decay else w
        yield min(start + segment, steps), float(loss), out['params']
