"""Poisson client sampling: determinism, rate, padding, capacity from the binomial tail."""
import math

import numpy as np
import pytest
from scipy import stats

from fedgen.privacy import sampling

N, Q = 500, 0.04


def test_deterministic_in_seed_and_round():
    cap = sampling.poisson_capacity(N, Q, rounds=100)
    a = sampling.poisson_clients(3, 7, N, Q, cap)
    b = sampling.poisson_clients(3, 7, N, Q, cap)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other_round = sampling.poisson_clients(3, 8, N, Q, cap)
    other_seed = sampling.poisson_clients(4, 7, N, Q, cap)
    assert not np.array_equal(a[0], other_round[0])
    assert not np.array_equal(a[0], other_seed[0])


def test_padding_layout():
    cap = sampling.poisson_capacity(N, Q, rounds=100)
    ids, present = sampling.poisson_clients(0, 0, N, Q, cap)
    assert ids.shape == present.shape == (cap, )
    assert ids.dtype == np.int32 and present.dtype == np.float32
    k = int(present.sum())
    np.testing.assert_array_equal(present, (np.arange(cap) < k).astype(np.float32))
    assert len(set(ids.tolist())) == cap  # padding ids are distinct, unsampled clients
    assert np.all(np.diff(ids[:k]) > 0)
    assert np.all((ids >= 0) & (ids < N))


def test_rate_and_per_client_inclusion():
    rounds = 2000
    cap = sampling.poisson_capacity(N, Q, rounds=rounds)
    counts = np.zeros(N)
    sizes = []
    for t in range(rounds):
        ids, present = sampling.poisson_clients(11, t, N, Q, cap)
        k = int(present.sum())
        sizes.append(k)
        counts[ids[:k]] += 1
    sizes = np.asarray(sizes)
    mean_sd = math.sqrt(N * Q * (1 - Q) / rounds)
    assert abs(sizes.mean() - N * Q) < 5 * mean_sd
    assert abs(sizes.var() / (N * Q * (1 - Q)) - 1) < 5 * math.sqrt(2 / rounds)
    # Each client joins ~ Binomial(rounds, Q) times, independently across clients.
    p = stats.chisquare(counts, np.full(N, counts.sum() / N)).pvalue
    assert p > 1e-3


def test_capacity_is_the_binomial_quantile():
    rounds, eps = 300, 1e-6
    cap = sampling.poisson_capacity(N, Q, rounds, eps)
    np.testing.assert_allclose(sampling.binomial_tail(N, Q)[[10, 20, 40]],
                               stats.binom.sf([10, 20, 40], N, Q),
                               rtol=1e-9)
    assert rounds * stats.binom.sf(cap, N, Q) <= eps
    assert rounds * stats.binom.sf(cap - 1, N, Q) > eps
    assert sampling.poisson_capacity(N, 1.0, 10) == N


def test_overflow_raises_instead_of_truncating():
    with pytest.raises(ValueError, match='capacity') as err:
        for t in range(50):
            sampling.poisson_clients(0, t, N, Q, capacity=int(N * Q) - 5)
    assert '\n' not in str(err.value)


def test_rate_validation():
    with pytest.raises(ValueError, match=r'expected count .* x num_clients = 100'):
        sampling.poisson_clients(0, 0, 100, 0.005, 10)
    with pytest.raises(ValueError, match=r'^dp sampling rate'):
        sampling.poisson_capacity(100, 1.5, 10)
    with pytest.raises(ValueError, match=r'^fed\.dp sampling rate'):
        sampling.poisson_capacity(100, 1.5, 10, section='fed.')
    with pytest.raises(ValueError, match=r'\[1, fed\.num_clients=100\]'):
        sampling.poisson_clients(0, 0, 100, 0.5, 101, section='fed.')


def test_fixed_is_the_runs_sampling():
    ids, present = sampling.fixed_clients(0, 3, N, 20)
    assert ids.shape == (20, ) and present.sum() == 20 and len(set(ids.tolist())) == 20
