"""Per-client persistent state on the client's own node: FedSA's B_k, Ditto's and local-only's v_k.

In simulation these rows live in ``ServerState.clients`` [N, ...] and a round does

    clients[k] <- clients[k] + kept_k * live_k      live_k = reported, finite and sampled

In deployment row k never leaves the node that holds client k. The ClientApp of round t writes

    <cache-dir>/client_rows/<run key>/client_<k>/after_<t>.npz = row_k(start of t) + kept_k live_k

(atomically: a temporary file, then a rename), and the server, which alone knows whether the
reply arrived and was used, sends with every ``train`` message the last round s < t in which
client k's upload counted (``last-used``, -1 for none): the client starts round t from
``after_<s>`` (or from the method's initial row when s = -1). A round the server replays after a
resume rewrites the same file with the same numbers, and a reply that got lost is simply never
named, so the client's row follows the server's rule exactly. The run key hashes the server's
workdir and the config (without the fields a resume may change), so runs sharing a cache dir
never read each other's rows (and the directory is not experiments.personalize's personal/).
"""
import hashlib
import json
import os

import jax
import numpy as np
from flax import traverse_util

from experiments import writers

# Methods whose client keeps a persistent row: their ``client_phase`` reads ``state.clients``.
PERSONAL = ('ditto', 'fedsa', 'local_only')


def run_key(record: str, workdir: str) -> str:
    """16 hex digits identifying the run: sha256 of the server's workdir and the config's JSON
    (``record``) without writers.RUN_FREE fields (rounds, eval, ... may change on resume)."""
    flat = traverse_util.flatten_dict(json.loads(record), sep='.')
    kept = {
        k: v
        for k, v in flat.items()
        if not any(k == f or k.startswith(f + '.') for f in writers.RUN_FREE)
    }
    text = json.dumps({'workdir': os.path.abspath(workdir), 'config': kept}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_path(cache_dir: str, key: str, cid: int, rnd: int) -> str:
    """The file of client ``cid``'s row after round ``rnd`` (0-based) of run ``key``."""
    return os.path.join(cache_dir, 'client_rows', key, f'client_{cid}', f'after_{rnd:06d}.npz')


def initial_row(clients, cid: int):
    """Row ``cid`` of the method's initial ``state.clients`` [N, ...] (host arrays [...])."""
    return jax.tree.map(lambda x: np.asarray(x[cid]), clients)


def save(path: str, row) -> None:
    """Writes the row's leaves (flattening order) to ``path`` atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        np.savez(f, *[np.asarray(x) for x in jax.tree.leaves(row)])
    os.replace(tmp, path)


def load(path: str, template):
    """The row stored at ``path``, in ``template``'s structure (arrays or ShapeDtypeStructs [...]);
    a missing file or a leaf of another shape or dtype is a one-line ValueError."""
    if not os.path.exists(path):
        raise ValueError(f'no personal state at {path}: this node lost the client\'s row (or the '
                         'node serving this client changed)')
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as f:
        got = [f[f'arr_{i}'] for i in range(len(f.files))]
    if len(got) != len(leaves) or any(x.shape != tuple(t.shape) or x.dtype != np.dtype(t.dtype)
                                      for x, t in zip(got, leaves)):
        raise ValueError(f'personal state at {path} does not match this run\'s rows')
    return jax.tree.unflatten(treedef, got)


def start_row(cache_dir: str, key: str, cid: int, last_used: int, init_clients):
    """Client ``cid``'s row at the start of a round whose last counted round was ``last_used``
    (-1: none, the initial row of ``init_clients`` [N, ...])."""
    first = initial_row(init_clients, cid)
    if last_used < 0:
        return first
    return load(row_path(cache_dir, key, cid, last_used), first)


def apply_kept(row, kept, live: float):
    """row + kept * live for one client (``kept`` rows [1, ...]; live 0 keeps the row as is,
    NaN-safe like engine.zero_where)."""
    return jax.tree.map(lambda x, d: x + np.where(live > 0,
                                                  np.asarray(d)[0], 0).astype(x.dtype), row, kept)


def last_used(rows: list[dict]) -> dict:
    """client id -> the last 0-based round whose metrics row lists it in ``deploy_used_ids``."""
    out = {}
    for row in rows:
        for cid in row.get('deploy_used_ids', []):
            out[int(cid)] = int(row['round']) - 1
    return out
