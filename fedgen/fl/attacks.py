"""Simulated Byzantine clients: a fixed set of attacker ids and what they upload instead.

The attackers are the first round(fraction * N) ids of a seeded permutation of 0..N-1, so the set
is fixed for the whole run (and across resumes). An attacker k replaces its honest upload u_k:

    'none'       u_k
    'sign_flip'  -u_k
    'scale'      scale * u_k
    'gaussian'   noise_norm * z_k / ||z_k||, z_k ~ N(0, I) over the client's whole tree
    'same_value' noise_norm * z / ||z||, one z shared by every attacker (colluders agree on it)

Shapes: uploads is a pytree of [C, ...] leaves, is_attacker [C] (1 = attacker); the kind is static
(a Python string), scale and noise_norm may be traced. Honest clients are returned bit for bit.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KINDS = ('none', 'sign_flip', 'scale', 'gaussian', 'same_value')


def attacker_ids(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted attacker ids: the first round(fraction * N) of a permutation seeded by ``seed``."""
    count = int(round(fraction * num_clients))
    perm = np.random.default_rng([seed, 0xA77AC]).permutation(num_clients)
    return np.sort(perm[:count])


def attacker_mask(client_ids: jax.Array,
                  num_clients: int,
                  fraction: float,
                  seed: int = 0) -> jax.Array:
    """[C] f32, 1 where client_ids[c] is an attacker; ids outside [0, N) (padding) are honest."""
    table = np.zeros(num_clients, np.float32)
    table[attacker_ids(num_clients, fraction, seed)] = 1.0
    ids = jnp.asarray(client_ids)
    valid = (ids >= 0) & (ids < num_clients)
    return jnp.where(valid, jnp.asarray(table)[jnp.clip(ids, 0, num_clients - 1)], 0.0)


def _unit_noise(key: jax.Array, like: PyTree) -> PyTree:
    """A Gaussian direction over the whole tree ``like`` (no client axis), of L2 norm 1."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    z = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in z))
    return jax.tree.unflatten(treedef, [v / jnp.maximum(norm, 1e-30) for v in z])


def apply(kind: str,
          uploads: PyTree,
          is_attacker: jax.Array,
          key: jax.Array,
          scale=1.0,
          noise_norm=1.0,
          *,
          section: str = '') -> PyTree:
    """Replaces the attackers' uploads (see the module docstring); ``key`` is the round's key.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if kind not in KINDS:
        raise ValueError(f'{section}attack.kind must be one of {KINDS}, got {kind!r}')
    if kind == 'none':
        return uploads
    num = is_attacker.shape[0]
    if kind == 'sign_flip':
        bad = jax.tree.map(lambda x: -x, uploads)
    elif kind == 'scale':
        bad = jax.tree.map(lambda x: (jnp.asarray(scale, jnp.float32) * x).astype(x.dtype), uploads)
    else:
        one = jax.tree.map(lambda x: x[0], uploads)
        if kind == 'gaussian':
            keys = jax.random.split(key, num)
            z = jax.vmap(_unit_noise, in_axes=(0, None))(keys, one)
        else:
            z = jax.tree.map(lambda v: jnp.broadcast_to(v, (num, ) + v.shape),
                             _unit_noise(key, one))
        bad = jax.tree.map(lambda v, x: (jnp.asarray(noise_norm, jnp.float32) * v).astype(x.dtype),
                           z, uploads)

    def pick(x, b):
        sel = (is_attacker > 0).reshape((num, ) + (1, ) * (x.ndim - 1))
        return jnp.where(sel, b, x)

    return jax.tree.map(pick, uploads, bad)


def check(kind: str,
          fraction: float,
          scale: float = 1.0,
          noise_norm: float = 1.0,
          *,
          section: str = '') -> None:
    """One-line ValueErrors naming the attack.* field (kind, fraction, scale, noise_norm), before
    any compute.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if kind not in KINDS:
        raise ValueError(f'{section}attack.kind must be one of {KINDS}, got {kind!r}')

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f'{section}attack.fraction must be a number in [0, 1), got {fraction!r}')
    if not number(scale):
        raise ValueError(f'{section}attack.scale must be a finite number, got {scale!r}')
    if not (number(noise_norm) and noise_norm >= 0.0):
        raise ValueError(f'{section}attack.noise_norm must be a finite number >= 0, '
                         f'got {noise_norm!r}')
