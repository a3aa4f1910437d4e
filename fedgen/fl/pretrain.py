"""Central pre-training of the backbone on the server's public portion, before it is frozen.

The public portion is disjoint from every client's data (the task says which portion). Training is
the same single-client update as federated clients run (``client.make_local_update`` with every
leaf trainable), in jitted segments of a fixed number of steps so it compiles once and can report
progress; the optimizer state carries across segments. A backbone is identified by the hash of its
*recipe* (model, pre-training settings, public-data spec, seed), which keys its cache.
"""
import hashlib
import json
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen.fl import local_update as client

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


def train(loss_fn: Callable,
          tx: optax.GradientTransformation,
          params: PyTree,
          examples: dict,
          steps: int,
          batch_size: int,
          seed: int,
          segment: int = 100) -> Iterator[tuple]:
    """Yields (steps_done, mean_train_loss_of_segment, params) after every segment of steps.

    examples: field -> [N, ...]; the final partial segment is padded with masked (no-op) steps.
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f'steps must be an int >= 0, got {steps!r}')
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
        yield min(start + segment, steps), float(loss), w['params']
