"""Host-side client sampling and packing of uneven clients into dense arrays.

A round's data is dense: ``batches[k]`` is [C, S, B, ...] for every example field k, plus a
per-example ``weight`` [C, S, B] (0 for padding examples), a step ``mask`` [C, S] (0 for padding
steps, which the client treats as no-ops) and ``n_k`` [C], the client's local example count used as
the aggregation weight. S is fixed for the whole run (computed from the largest client), so the
round function traces once. Every random choice derives from (seed, round, client id), so a resumed
run packs exactly the same data as an unbroken one.
"""
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class RoundData:
    """One round's device inputs; C = sampled clients, S = local steps, B = batch size."""
    client_ids: np.ndarray  # [C] int32
    batches: dict  # field -> [C, S, B, ...]; includes 'weight' [C, S, B]
    mask: np.ndarray  # [C, S] float32
    n_k: np.ndarray  # [C] float32
    # Traced fate rates (fates.FateRates) for this round, or None for the method's own rates.
    rates: Any = None
    # Traced hyper-parameters (hparams.HParams) for this round, or None for the compiled ones.
    hparams: Any = None


def sample_clients(seed: int,
                   rnd: int,
                   num_clients: int,
                   per_round: int,
                   *,
                   section: str = '') -> np.ndarray:
    """Sorted ids of ``per_round`` distinct clients, a pure function of (seed, rnd); errors call
    per_round clients_per_round.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not 1 <= per_round <= num_clients:
        raise ValueError(f'{section}clients_per_round must be in '
                         f'[1, {section}num_clients={num_clients}], '
                         f'got {per_round}')
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return np.sort(rng.choice(num_clients, size=per_round, replace=False)).astype(np.int32)


def steps_per_epoch(n: int, batch_size: int, max_steps: int = 0) -> int:
    """ceil(n / B), capped at ``max_steps`` when it is > 0."""
    s = math.ceil(n / batch_size)
    return min(s, max_steps) if max_steps > 0 else s


def num_local_steps(sizes: Sequence[int],
                    batch_size: int,
                    epochs: int,
                    max_steps: int = 0,
                    *,
                    section: str = '') -> int:
    """The fixed S of a run: E * steps_per_epoch of the largest client; errors call ``epochs``
    local_epochs.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if epochs < 1:
        raise ValueError(f'{section}local_epochs must be >= 1, got {epochs}')
    if batch_size < 1:
        raise ValueError(f'{section}batch_size must be >= 1, got {batch_size}')
    return epochs * steps_per_epoch(max(sizes), batch_size, max_steps)


def client_schedule(n: int,
                    batch_size: int,
                    epochs: int,
                    steps: int,
                    rng: np.random.Generator,
                    max_steps: int = 0) -> np.ndarray:
    """Local example positions [steps, B] for one client; -1 marks padding.

    Each epoch is a fresh permutation of the n local examples cut into ceil(n/B) batches (at most
    ``max_steps``); the last batch of an epoch is padded. Steps beyond E epochs are all padding.
    """
    spe = steps_per_epoch(n, batch_size, max_steps)
    out = np.full((steps, batch_size), -1, np.int64)
    for e in range(epochs):
        perm = rng.permutation(n)[:spe * batch_size]
        padded = np.full(spe * batch_size, -1, np.int64)
        padded[:len(perm)] = perm
        out[e * spe:(e + 1) * spe] = padded.reshape(spe, batch_size)
    return out


def pack_clients(examples: dict,
                 client_indices: Sequence[np.ndarray],
                 ids: Sequence[int],
                 seed: int,
                 rnd: int,
                 batch_size: int,
                 epochs: int,
                 steps: int,
                 max_steps: int = 0) -> RoundData:
    """Packs clients ``ids`` into a dense RoundData.

    examples: field -> [M, ...] array over the whole example pool; client_indices[c]: that client's
    pool indices. n_k = len(client_indices[c]).
    """
    pos = np.stack([
        client_schedule(len(client_indices[c]), batch_size, epochs, steps,
                        np.random.default_rng([seed, rnd, int(c), 0xB7]), max_steps) for c in ids
    ])  # [C, S, B]
    valid = pos >= 0
    glob = np.stack([
        np.asarray(client_indices[c])[np.maximum(p, 0)]
        if len(client_indices[c]) else np.zeros_like(p) for c, p in zip(ids, pos)
    ])
    batches = {k: v[glob] for k, v in examples.items()}
    batches['weight'] = valid.astype(np.float32)
    return RoundData(client_ids=np.asarray(ids, np.int32),
                     batches=batches,
                     mask=valid.any(-1).astype(np.float32),
                     n_k=np.asarray([len(client_indices[c]) for c in ids], np.float32))


def drop_absent(data: RoundData, present: np.ndarray) -> RoundData:
    """Slots with present = 0 (Poisson sampling's padding) carry no data: n_k = 0, no steps."""
    keep = np.asarray(present, np.float32)
    return data.replace(n_k=data.n_k * keep,
                        mask=data.mask * keep[:, None],
                        batches={
                            **data.batches, 'weight':
                            data.batches['weight'] * keep.reshape((-1, ) + (1, ) *
                                                                  (data.batches['weight'].ndim - 1))
                        })


def pad_clients(data: RoundData, multiple: int) -> RoundData:
    """Appends padding clients (n_k = 0, mask = 0) so C is a multiple of ``multiple``."""
    c = data.n_k.shape[0]
    extra = (-c) % multiple
    if extra == 0:
        return data
    pad = lambda x: np.concatenate([x, np.zeros((extra, ) + x.shape[1:], x.dtype)])
    return jax.tree.map(pad, data)


def batch_all(examples: dict, batch_size: int) -> dict:
    """Every example once, in order, as [NB, B, ...] with a padding ``weight`` [NB, B]."""
    m = len(next(iter(examples.values())))
    nb = math.ceil(m / batch_size)
    idx = np.arange(nb * batch_size)
    out = {
        k: v[np.minimum(idx, m - 1)].reshape((nb, batch_size) + v.shape[1:])
        for k, v in examples.items()
    }
    out['weight'] = (idx < m).astype(np.float32).reshape(nb, batch_size)
    return out
