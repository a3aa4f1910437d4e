"""Runs one client function over a stacked population in a single program.

``map_clients(fn, shared, per_client, chunk)`` evaluates fn(shared, x_k) for every client k, where
every leaf of ``per_client`` is [C, ...] and ``shared`` (the frozen backbone and the global
trainable tree) is broadcast, never stacked or copied per client (vmap in_axes=None).

- chunk >= C: one ``vmap`` over all C clients (peak memory grows with C);
- 1 <= chunk < C: ``lax.map(..., batch_size=chunk)``: a scan over C/chunk groups, each a vmap over
  ``chunk`` clients, so peak memory is bounded by the chunk (the remainder is one smaller vmap);
- ``loop_clients`` is the per-client reference: one jitted call per client from Python.

This is the only module that talks about devices: ``client_mesh`` and ``shard_clients`` place the
client axis on a 1-D mesh named 'clients' (replicating everything else).
"""
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def map_clients(fn: Callable, shared: PyTree, per_client: PyTree, chunk: int) -> PyTree:
    """Stacked [C, ...] outputs of fn(shared, x_k) over the leading axis of ``per_client``."""
    c = jax.tree.leaves(per_client)[0].shape[0]
    if chunk < 1:
        raise ValueError(f'fed.client_chunk must be >= 1, got {chunk}')
    if chunk >= c:
        return jax.vmap(fn, in_axes=(None, 0))(shared, per_client)
    return jax.lax.map(lambda x: fn(shared, x), per_client, batch_size=chunk)


def loop_clients(fn: Callable, shared: PyTree, per_client: PyTree) -> PyTree:
    """Reference: a Python loop of jitted single-client calls, outputs stacked on axis 0."""
    jfn = jax.jit(fn)
    c = jax.tree.leaves(per_client)[0].shape[0]
    outs = [jfn(shared, jax.tree.map(lambda x, i=i: x[i], per_client)) for i in range(c)]
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *outs)


def client_mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh over the first ``num_devices`` devices (default: all), axis name 'clients'."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f'fed.num_devices must be in [1, {len(devices)}], got {n}')
    return Mesh(np.asarray(devices[:n]), ('clients', ))


def shard_clients(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every [C, ...] leaf with its client axis split over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P('clients')))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf fully replicated on the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
