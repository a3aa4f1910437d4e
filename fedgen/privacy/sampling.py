"""Host-side client sampling that matches the DP accounting, padded to a fixed capacity.

Poisson sampling: every one of N clients joins round t independently with probability q, so the
count K_t ~ Binomial(N, q) varies. The round keeps static shapes by padding to a fixed capacity c:
``ids`` [c] int32 and ``present`` [c] float32 (1 for the K_t sampled clients, 0 for padding).
Padding slots carry distinct ids of clients NOT sampled this round (the lowest such ids), so
packing data and keying per-client randomness need no special case; their weight is 0.

Capacity: the smallest c with  T * P(Binomial(N, q) > c) <= overflow_prob, a union bound over the
T rounds of the run, computed exactly from the binomial pmf (log space, summed from the top).
Policy when a round still draws K_t > c: raise ValueError. Truncating the sample would change the
mechanism that the accountant certifies, so it is never done silently.

Fixed-size sampling (without replacement) is ``fedgen.data.batching.sample_clients``; its
accounting is the replace-one relation in ``accounting``.
"""
import math
from typing import Tuple

import numpy as np

from fedgen.data import batching

_TAG = 0xD9  # separates this stream from the other (seed, round) streams


def check_rate(num_clients: int, q: float, *, section: str = '') -> None:
    """One-line ValueErrors for a sampling rate that cannot work.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not 0 < q <= 1:
        raise ValueError(f'{section}dp sampling rate q must be in (0, 1], got {q}')
    if q * num_clients < 1:
        raise ValueError(f'Poisson sampling needs an expected count q N >= 1, got q = {q} x '
                         f'{section}num_clients = {num_clients} = {q * num_clients:g}')


def binomial_tail(n: int, q: float) -> np.ndarray:
    """[n + 1] array: P(Binomial(n, q) > c) for c = 0..n, without 1 - cdf cancellation."""
    k = np.arange(n + 1)
    lg = np.vectorize(math.lgamma)
    if q == 1.0:
        pmf = (k == n).astype(np.float64)
    else:
        logpmf = (lg(n + 1.0) - lg(k + 1.0) - lg(n - k + 1.0) + k * math.log(q) +
                  (n - k) * math.log1p(-q))
        pmf = np.exp(logpmf)
    upper = np.cumsum(pmf[::-1])[::-1]  # P(X >= c)
    return np.append(upper[1:], 0.0)  # P(X > c) = P(X >= c + 1)


def poisson_capacity(num_clients: int,
                     q: float,
                     rounds: int,
                     overflow_prob: float = 1e-6,
                     *,
                     section: str = '') -> int:
    """Smallest c with rounds * P(Binomial(N, q) > c) <= overflow_prob.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    check_rate(num_clients, q, section=section)
    if not 0 < overflow_prob < 1:
        raise ValueError(f'overflow probability must be in (0, 1), got {overflow_prob}')
    tail = binomial_tail(num_clients, q)
    ok = np.nonzero(tail * max(rounds, 1) <= overflow_prob)[0]
    return int(max(ok[0], 1))


def poisson_clients(seed: int,
                    rnd: int,
                    num_clients: int,
                    q: float,
                    capacity: int,
                    *,
                    section: str = '') -> Tuple[np.ndarray, np.ndarray]:
    """(ids [capacity] int32, present [capacity] float32), a pure function of (seed, rnd).

    ids[:K] are the sampled clients (sorted), ids[K:] padding with present 0.
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    check_rate(num_clients, q, section=section)
    if not 1 <= capacity <= num_clients:
        raise ValueError(f'Poisson capacity must be in [1, {section}num_clients={num_clients}], '
                         f'got {capacity}')
    rng = np.random.default_rng([seed, rnd, _TAG])
    chosen = np.nonzero(rng.random(num_clients) < q)[0]
    if len(chosen) > capacity:
        raise ValueError(f'round {rnd}: Poisson sampling drew {len(chosen)} clients > capacity '
                         f'{capacity}; rerun with a larger capacity (smaller overflow_prob)')
    pad = np.setdiff1d(np.arange(num_clients), chosen)[:capacity - len(chosen)]
    ids = np.concatenate([chosen, pad]).astype(np.int32)
    present = (np.arange(capacity) < len(chosen)).astype(np.float32)
    return ids, present


def fixed_clients(seed: int,
                  rnd: int,
                  num_clients: int,
                  per_round: int,
                  *,
                  section: str = '') -> Tuple[np.ndarray, np.ndarray]:
    """(ids [per_round], ones): the run's sampling without replacement, in the same form.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    ids = batching.sample_clients(seed, rnd, num_clients, per_round, section=section)
    return ids, np.ones(per_round, np.float32)
