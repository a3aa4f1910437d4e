"""Runs one client function over a stacked population in a single program.

``map_clients(fn, shared, per_client, chunk)`` evaluates fn(shared, x_k) for every client k, where
every leaf of ``per_client`` is [C, ...] and ``shared`` (the frozen backbone and the global
trainable tree) is broadcast, never stacked or copied per client (vmap in_axes=None).

- chunk >= C: one ``vmap`` over all C clients (peak memory grows with C);
- 1 <= chunk < C: ``lax.map(..., batch_size=chunk)``: a scan over C/chunk groups, each a vmap over
  ``chunk`` clients, so peak memory is bounded by the chunk (the remainder is one smaller vmap);
- ``loop_clients`` is the per-client reference: one jitted call per client from Python.

This is the only module that talks about devices. With a ``mesh`` (``client_mesh``: 1-D, axis
'clients'), ``map_clients`` runs under ``jax.shard_map``: ``shared`` is replicated (P()), the client
axis of ``per_client`` and of the outputs is split over devices (P('clients')), and each device runs
the same chunked map over its C / num_devices local clients. A weighted mean of the [C, ...] outputs
taken afterwards (aggregate.weighted_mean) is a sharded contraction, i.e. a local sum plus a psum.
C must be a multiple of the device count (``batching.pad_clients`` adds n_k = 0 clients).

Several processes (``jax.distributed``, one per host): the mesh spans every process's devices and
each process holds the rows [lo, hi) = ``process_rows(mesh, C)`` of the client axis, the block of
its own devices. It packs only those clients and ``shard_clients(local, mesh, C)`` assembles the
global [C, ...] arrays (``jax.make_array_from_process_local_data``); replicated trees must hold the
same values on every process. ``is_primary`` (process 0) decides who writes files; ``barrier``
waits for every process.

Chunk from a memory budget: one client of a round costs ``client_bytes`` (XLA's memory analysis of a
compiled 1- and 2-client vmap: the growth per extra client), and ``chunk_for_budget`` picks

    chunk = clip(floor(budget_bytes / bytes_per_client), 1, C_local).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def _local_map(fn: Callable, shared: PyTree, per_client: PyTree, chunk: int) -> PyTree:
    """vmap over chunks of ``chunk`` clients, one chunk after another; chunk 1 is a plain
    ``lax.map`` (no vmap of a size-1 axis), so a scalar ``lax.cond`` inside ``fn`` (padded steps
    and batches) stays a branch instead of becoming a select that runs both sides."""
    c = jax.tree.leaves(per_client)[0].shape[0]
    if chunk >= c:
        return jax.vmap(fn, in_axes=(None, 0))(shared, per_client)
    if chunk == 1:
        return jax.lax.map(lambda x: fn(shared, x), per_client)
    return jax.lax.map(lambda x: fn(shared, x), per_client, batch_size=chunk)


def _active_map(fn: Callable, shared: PyTree, per_client: PyTree, chunk: int,
                active: jax.Array) -> PyTree:
    """Like :func:`_local_map`, without the work of absent clients: the active clients are moved
    to the front (a stable sort, so their order is kept), the C clients are cut into ceil(C / k)
    chunks of k = min(chunk, C) (the last padded with copies of client 0), and a chunk with no
    active client is skipped by a scalar ``lax.cond`` (its outputs are zeros). Outputs return to
    the input order; an inactive client's row is its computed value or zeros, never used."""
    c = active.shape[0]
    k = min(chunk, c)
    n = -(-c // k)
    order = jnp.argsort(jnp.logical_not(active), stable=True)
    pad = jnp.concatenate([order, jnp.zeros((n * k - c, ), order.dtype)])
    live = jnp.concatenate([active[order], jnp.zeros((n * k - c, ), bool)]).reshape(n, k)
    xs = jax.tree.map(lambda x: x[pad].reshape((n, k) + x.shape[1:]), per_client)
    run = jax.vmap(fn, in_axes=(None, 0))
    shapes = jax.eval_shape(lambda x: run(shared, x), jax.tree.map(lambda x: x[0], xs))
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731

    def one(args):
        x, any_live = args
        return jax.lax.cond(any_live, lambda x: run(shared, x), lambda x: zeros(), x)

    out = jax.lax.map(one, (xs, live.any(axis=1)))
    inverse = jnp.argsort(order)
    return jax.tree.map(lambda y: y.reshape((n * k, ) + y.shape[2:])[:c][inverse], out)


def map_clients(fn: Callable,
                shared: PyTree,
                per_client: PyTree,
                chunk: int,
                mesh: Mesh | None = None,
                active: jax.Array | None = None,
                *,
                section: str = '') -> PyTree:
    """Stacked [C, ...] outputs of fn(shared, x_k) over the leading axis of ``per_client``.

    ``chunk`` counts clients per vmap on one device; with a ``mesh`` the [C, ...] inputs and
    outputs are sharded over its 'clients' axis and ``shared`` is replicated. ``active`` [C] bool:
    the clients whose outputs will be used (sampled and reporting); chunks without one are not
    computed (:func:`_active_map`), so padded Poisson capacity and dropouts cost no local steps.
    Errors call ``chunk`` client_chunk, C clients_per_round and the mesh size num_devices.
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    c = jax.tree.leaves(per_client)[0].shape[0]
    if chunk < 1:
        raise ValueError(f'{section}client_chunk must be >= 1, got {chunk}')

    def local(s, x):
        if active is None:
            return _local_map(fn, s, x, chunk)
        x, a = x
        return _active_map(fn, s, x, chunk, a)

    inputs = per_client if active is None else (per_client, active)
    if mesh is None:
        return local(shared, inputs)
    n = mesh.shape['clients']
    if c % n:
        raise ValueError(f'{section}clients_per_round (C={c}) must be a multiple of '
                         f'{section}num_devices={n}; '
                         'pad with batching.pad_clients')
    # Explicit SPMD: every device maps fn over its own C/n clients; nothing crosses devices here.
    # check_vma is off because a client's scan carry starts from the replicated w_G and becomes
    # device-varying after one step (jax rejects that carry type change under check_vma=True).
    return jax.shard_map(local,
                         mesh=mesh,
                         in_specs=(P(), P('clients')),
                         out_specs=P('clients'),
                         check_vma=False)(shared, inputs)


def loop_clients(fn: Callable, shared: PyTree, per_client: PyTree) -> PyTree:
    """Reference: a Python loop of jitted single-client calls, outputs stacked on axis 0."""
    jfn = jax.jit(fn)
    c = jax.tree.leaves(per_client)[0].shape[0]
    outs = [jfn(shared, jax.tree.map(lambda x, i=i: x[i], per_client)) for i in range(c)]
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *outs)


def client_mesh(num_devices: int | None = None, *, section: str = '') -> Mesh:
    """1-D mesh over the first ``num_devices`` devices (default: all), axis name 'clients'.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f'{section}num_devices must be in [1, {len(devices)}], got {n}')
    return Mesh(np.asarray(devices[:n]), ('clients', ))


def mesh_for(num_devices: int, *, section: str = '') -> Mesh | None:
    """The run's mesh: num_devices = 0 means every device; None when it is one device.

    With several processes the mesh must span every process's devices (each process runs its
    share of the clients), so only 0 or the global device count is allowed.
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    n = jax.device_count() if num_devices == 0 else num_devices
    if jax.process_count() > 1 and n != jax.device_count():
        raise ValueError(f'{section}num_devices must be 0 or {jax.device_count()} (every device) '
                         f'in a run of {jax.process_count()} processes, got {num_devices}')
    return client_mesh(n, section=section) if n != 1 else None


def process_rows(mesh: Mesh | None, num_clients: int) -> tuple[int, int]:
    """[lo, hi): the rows of a [num_clients, ...] client axis split over ``mesh`` that this
    process's devices hold (the whole axis without a mesh or with one process)."""
    if mesh is None:
        return 0, num_clients
    index = NamedSharding(mesh, P('clients')).addressable_devices_indices_map((num_clients, ))
    spans = sorted(s[0].indices(num_clients)[:2] for s in index.values())
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:  # a 1-D mesh built from jax.devices() never is
        raise ValueError(f'this process holds non-contiguous client rows {spans}')
    return lo, hi


def shard_clients(tree: PyTree, mesh: Mesh, num_clients: int | None = None) -> PyTree:
    """Global arrays with the client axis split over the mesh, from this process's rows.

    Every leaf of ``tree`` holds rows ``process_rows(mesh, num_clients)`` of the global
    [num_clients, ...] leaf; ``num_clients=None`` means the tree is the whole axis (one process).
    """
    sharding = NamedSharding(mesh, P('clients'))

    def one(x):
        x = np.asarray(x)
        shape = None if num_clients is None else (num_clients, ) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf fully replicated on the mesh (every process passes the same values).

    Leaves go through host memory: a process cannot move an array that lives on its own device
    to other processes' devices, but each can place its identical host copy on its own devices."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        tree)


def to_host(tree: PyTree) -> PyTree:
    """Every leaf as a host numpy array of its global value, on every process (a leaf split
    over several processes' devices is all-gathered; a replicated one is read locally)."""

    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def is_primary() -> bool:
    """Whether this is process 0, the one process that writes a run's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def client_bytes(fn: Callable, shared: PyTree, per_client: PyTree) -> int:
    """Bytes one more client adds to a vmapped round: XLA temp + output memory of a compiled
    2-client vmap minus a 1-client vmap (abstract shapes only; nothing runs).

    ``per_client`` leaves are [C, ...] (arrays or ShapeDtypeStructs; only shapes are used).
    """

    def abstract(k):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, ) + tuple(x.shape[1:]), x.dtype),
                            per_client)

    def cost(k):
        vm = jax.jit(lambda s, x: jax.vmap(fn, in_axes=(None, 0))(s, x))
        mem = vm.lower(shared, abstract(k)).compile().memory_analysis()
        return mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes

    return max(int(cost(2) - cost(1)), 1)


def chunk_for_budget(bytes_per_client: int,
                     budget_bytes: int,
                     num_clients: int,
                     *,
                     section: str = '') -> int:
    """Clients per vmap that fit ``budget_bytes``: clip(budget // bytes_per_client, 1, C).

    num_clients is the per-device client count C / num_devices. A chunk of 1 is always allowed (the
    budget can then be exceeded; nothing smaller exists). The budget's error calls it
    client_mem_budget_mb (in MB).
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if budget_bytes <= 0:
        raise ValueError(f'{section}client_mem_budget_mb must be > 0, '
                         f'got {budget_bytes / 2**20:g} MB')
    if bytes_per_client <= 0 or num_clients < 1:
        raise ValueError(f'bytes_per_client must be > 0 and C >= 1, got {bytes_per_client}, '
                         f'{num_clients}')
    return int(min(max(budget_bytes // bytes_per_client, 1), num_clients))
