"""Tests for fedgen.data.partition: coverage, determinism, skew and validation."""
import numpy as np
import pytest

from fedgen.data import partition

N, K = 600, 10
LABELS = np.repeat(np.arange(6), N // 6)[np.random.default_rng(0).permutation(N)]


def _assert_partition(parts, n, num_clients):
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert (np.diff(p) > 0).all()  # sorted, no duplicates within a client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


CASES = {
    'iid': dict(),
    'shards': dict(),
    'quantity': dict(alpha=0.3),
    'dirichlet': dict(labels=LABELS, alpha=0.3),
    'k_classes': dict(labels=LABELS, k=2),
}


@pytest.mark.parametrize('kind', partition.KINDS)
def test_every_kind_covers_once_and_is_deterministic(kind):
    a = partition.make(kind, N, K, seed=1, **CASES[kind])
    _assert_partition(a, N, K)
    assert min(p.size for p in a) >= 1
    assert _same(a, partition.make(kind, N, K, seed=1, **CASES[kind]))
    if kind != 'shards':
        assert not _same(a, partition.make(kind, N, K, seed=2, **CASES[kind]))


def test_iid_and_shards_sizes():
    sizes = [p.size for p in partition.iid(103, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1
    parts = partition.shards(103, 10)
    for p in parts:
        np.testing.assert_array_equal(p, np.arange(p[0], p[0] + p.size))  # contiguous
    assert parts[0][0] == 0


def _mean_label_entropy(parts, labels):
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=labels.max() + 1) / p.size
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_dirichlet_reacts_to_alpha():
    skewed = partition.dirichlet(LABELS, K, alpha=0.1, seed=0)
    flat = partition.dirichlet(LABELS, K, alpha=100.0, seed=0)
    h_skewed = _mean_label_entropy(skewed, LABELS)
    h_flat = _mean_label_entropy(flat, LABELS)
    assert h_skewed < h_flat
    assert h_flat > 0.9 * np.log(6)  # near-uniform label mix per client
    assert h_skewed < 0.6 * np.log(6)


def test_dirichlet_min_size_and_failure():
    parts = partition.dirichlet(LABELS, 40, alpha=0.5, seed=0, min_size=3)
    _assert_partition(parts, N, 40)
    assert min(p.size for p in parts) >= 3
    # 300 clients with >= 2 examples each out of 600 under a tiny alpha: never happens.
    with pytest.raises(ValueError, match='data.partition.alpha'):
        partition.dirichlet(LABELS, 300, alpha=0.01, seed=0, min_size=2, max_tries=3)


def test_quantity_skew_sizes():
    parts = partition.quantity_skew(N, K, alpha=0.2, seed=0, min_size=5)
    _assert_partition(parts, N, K)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 5
    flat = np.array([p.size for p in partition.quantity_skew(N, K, alpha=1e4, seed=0)])
    assert sizes.std() > 5 * flat.std()


def test_k_classes_exactly_k_labels():
    for k in (1, 2, 4, 6):
        parts = partition.k_classes(LABELS, K, k, seed=3)
        _assert_partition(parts, N, K)
        for p in parts:
            assert np.unique(LABELS[p]).size == k


def test_local_split():
    parts = partition.dirichlet(LABELS, K, alpha=0.5, seed=0) + [np.array([7]), np.array([3, 9])]
    train, test = partition.local_split(parts, 0.2, seed=0)
    for p, tr, te in zip(parts, train, test):
        assert np.intersect1d(tr, te).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), p)
        assert tr.size >= 1
        if p.size >= 2:
            assert te.size == max(1, round(0.2 * p.size))
    assert test[-2].size == 0 and test[-1].size == 1
    train0, test0 = partition.local_split(parts, 0.0, seed=0)
    assert all(t.size == 0 for t in test0)
    again = partition.local_split(parts, 0.2, seed=0)
    assert _same(train, again[0]) and _same(test, again[1])


@pytest.mark.parametrize('call, field', [
    (lambda: partition.iid(10, 0, 0), 'fed.num_clients'),
    (lambda: partition.shards(10, 11), 'fed.num_clients'),
    (lambda: partition.quantity_skew(10, 2, 0.0, 0), 'data.partition.alpha'),
    (lambda: partition.dirichlet(LABELS, K, -1.0, 0), 'data.partition.alpha'),
    (lambda: partition.dirichlet(LABELS, N + 1, 1.0, 0), 'fed.num_clients'),
    (lambda: partition.quantity_skew(10, 5, 1.0, 0, min_size=3), 'data.partition.min_size'),
    (lambda: partition.k_classes(LABELS, K, 0, 0), 'data.partition.k'),
    (lambda: partition.k_classes(LABELS, K, 7, 0), 'data.partition.k'),
    (lambda: partition.k_classes(LABELS, 2, 1, 0), 'data.partition.k'),
    (lambda: partition.local_split([np.arange(4)], 1.0, 0), 'data.partition.local_test_fraction'),
    (lambda: partition.local_split([np.arange(4)], -0.1, 0), 'data.partition.local_test_fraction'),
    (lambda: partition.make('zipf', N, K, 0), 'data.partition.kind'),
    (lambda: partition.make('dirichlet', N, K, 0), 'data.partition.kind'),
])
def test_validation(call, field):
    with pytest.raises(ValueError, match=field.replace('.', r'\.')) as err:
        call()
    assert '\n' not in str(err.value)
