"""Tests for fedgen.data.partition: coverage, determinism, skew and validation."""
import re

import numpy as np
import pytest

from fedgen import tasks
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
    'dirichlet_label': dict(labels=LABELS, alpha=0.3),
    'dirichlet_client': dict(labels=LABELS, alpha=0.3),
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


@pytest.mark.parametrize('scheme', [partition.dirichlet_label, partition.dirichlet_client])
def test_dirichlet_schemes_react_to_alpha(scheme):
    skewed = scheme(LABELS, K, alpha=0.1, seed=0)
    flat = scheme(LABELS, K, alpha=100.0, seed=0)
    h_skewed = _mean_label_entropy(skewed, LABELS)
    h_flat = _mean_label_entropy(flat, LABELS)
    assert h_skewed < h_flat
    assert h_flat > 0.9 * np.log(6)  # near-uniform label mix per client
    assert h_skewed < 0.6 * np.log(6)


def test_dirichlet_label_min_size_and_failure():
    parts = partition.dirichlet_label(LABELS, 40, alpha=0.5, seed=0, min_size=3)
    _assert_partition(parts, N, 40)
    assert min(p.size for p in parts) >= 3
    # 300 clients with >= 2 examples each out of 600 under a tiny alpha: never happens.
    with pytest.raises(ValueError,
                       match=r'^alpha=0\.01: no Dirichlet draw in 3 tries gave '
                       r'every one of num_clients=300 clients >= min_size=2 examples'):
        partition.dirichlet_label(LABELS, 300, alpha=0.01, seed=0, min_size=2, max_tries=3)


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
    parts = partition.dirichlet_label(LABELS, K, alpha=0.5,
                                      seed=0) + [np.array([7]), np.array([3, 9])]
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
    (lambda: partition.iid(10, 0, 0), 'num_clients=0'),
    (lambda: partition.shards(10, 11), 'num_clients=11'),
    (lambda: partition.quantity_skew(10, 2, 0.0, 0), 'alpha=0.0'),
    (lambda: partition.dirichlet_label(LABELS, K, -1.0, 0), 'alpha=-1.0'),
    (lambda: partition.dirichlet_label(LABELS, N + 1, 1.0, 0), 'num_clients'),
    (lambda: partition.dirichlet_label(LABELS, K, 1.0, 0, max_tries=0), 'max_tries=0'),
    (lambda: partition.dirichlet_client(LABELS, K, 0.0, 0), 'alpha'),
    (lambda: partition.dirichlet_client(LABELS, N + 1, 1.0, 0), 'num_clients'),
    (lambda: partition.dirichlet_client(LABELS.astype(float), K, 1.0, 0), 'labels must be'),
    (lambda: partition.quantity_skew(10, 5, 1.0, 0, min_size=3), 'min_size=3'),
    (lambda: partition.k_classes(LABELS, K, 0, 0), 'k=0'),
    (lambda: partition.k_classes(LABELS, K, 7, 0), 'k=7'),
    (lambda: partition.k_classes(LABELS, 2, 1, 0), 'k=1'),
    (lambda: partition.local_split([np.arange(4)], 1.0, 0), 'test_fraction=1.0'),
    (lambda: partition.local_split([np.arange(4)], -0.1, 0), 'test_fraction=-0.1'),
    (lambda: partition.local_split_documents([np.arange(4)], np.arange(4), 1.0, 0),
     'test_fraction=1.0'),
    (lambda: partition.make('zipf', N, K, 0), "kind='zipf'"),
    (lambda: partition.make('dirichlet_label', N, K, 0), "kind='dirichlet_label'"),
    (lambda: partition.make('dirichlet_client', N, K, 0, labels=LABELS[:-1]),
     "kind='dirichlet_client'"),
    (lambda: partition.make('dirichlet', N, K, 0, labels=LABELS), "kind='dirichlet'"),
])
def test_validation(call, field):
    """Called directly, a split names its own parameters."""
    with pytest.raises(ValueError, match='^' + re.escape(field)) as err:
        call()
    assert '\n' not in str(err.value)


def test_validation_names_the_callers_fields():
    """With ``names`` (a task's PARTITION_NAMES) every parameter is named as the config does."""
    names = tasks.PARTITION_NAMES
    with pytest.raises(ValueError) as e:
        partition.quantity_skew(10, 5, 1.0, 0, min_size=3, names=names)
    assert str(e.value) == ('data.partition.min_size=3: must be an integer in '
                            '[0, n / fed.num_clients = 2]')
    with pytest.raises(ValueError) as e:
        partition.quantity_skew(10, 5, 1.0, 0, min_size=3)
    assert str(e.value) == 'min_size=3: must be an integer in [0, n / num_clients = 2]'
    with pytest.raises(ValueError, match=r'^data\.partition\.k=1: fed\.num_clients \* k = 2 '):
        partition.make('k_classes', N, 2, 0, labels=LABELS, k=1, names=names)
    with pytest.raises(ValueError, match=r'^data\.partition\.local_test_fraction=1\.0: '):
        partition.local_split([np.arange(4)], 1.0, 0, names=names)
    with pytest.raises(ValueError, match=r"^data\.partition\.kind='dirichlet' is ambiguous"):
        partition.make('dirichlet', N, K, 0, labels=LABELS, names=names)


# --- Defining statistics of each scheme --------------------------------------------------------
# Large pools so that sampling noise is a few percent; tolerances are a few standard errors.


def _dir_marginal_var(mean, concentration):
    """Var of one coordinate of a Dirichlet with that mean and total concentration a0."""
    return mean * (1 - mean) / (concentration + 1)


@pytest.mark.parametrize('alpha', [0.3, 3.0])
def test_dirichlet_label_each_label_split_over_clients_is_dir_alpha(alpha):
    # 100 labels x 1000 examples, 10 clients: the share s_ck of label c held by client k is
    # p_ck ~ Dir(alpha 1_K) up to rounding: mean 1/K, variance (1/K)(1 - 1/K)/(K alpha + 1).
    num_labels, per_label, k = 100, 1000, 10
    labels = np.repeat(np.arange(num_labels), per_label)
    parts = partition.dirichlet_label(labels, k, alpha, seed=0)
    _assert_partition(parts, labels.size, k)
    shares = np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts]) / per_label
    np.testing.assert_allclose(shares.sum(axis=0), 1.0)
    want = _dir_marginal_var(1 / k, k * alpha)
    # Over 15 seeds this variance is within 6% (1 sd) of `want`.
    assert shares.var() == pytest.approx(want, rel=0.2)


@pytest.mark.parametrize('alpha', [0.3, 3.0])
def test_dirichlet_label_size_skew(alpha):
    # |client k| = sum_c p_ck |I_c|, independent over labels: Var = L |I_c|^2 Var(p_ck), with
    # Var(p_ck) = (1/K)(1 - 1/K)/(K alpha + 1). 50 labels x 2000 examples, 100 clients, the
    # unbiased size variance averaged over 3 seeds (its relative sd: 13% at alpha = 0.3, 5% at 3).
    num_labels, per_label, k = 50, 2000, 100
    labels = np.repeat(np.arange(num_labels), per_label)
    var = [
        np.var([p.size for p in partition.dirichlet_label(labels, k, alpha, seed)], ddof=1)
        for seed in range(3)
    ]
    want = num_labels * per_label**2 * _dir_marginal_var(1 / k, k * alpha)
    assert np.mean(var) == pytest.approx(want, rel=0.4)


@pytest.mark.parametrize('alpha', [0.1, 1.0, 10.0])
def test_dirichlet_client_equal_sizes_and_class_mix_concentration(alpha):
    # Hsu et al.: q_k ~ Dir(alpha * p), p uniform over L = 10 labels, n_k = 200. The label
    # histogram q^_k of a client is Multinomial(n_k, q_k) / n_k, so
    # E[sum_c q^_kc^2] = sum_c [p_c^2 + Var q_kc + E q_kc(1 - q_kc) / n_k], with
    # Var q_kc = p_c(1 - p_c)/(alpha + 1). Checked on the first 40 of 100 clients, who draw
    # from a pool that is not yet exhausted (the last clients take what is left).
    num_labels, k, n_k = 10, 100, 200
    labels = np.random.default_rng(1).permutation(
        np.repeat(np.arange(num_labels), k * n_k // num_labels))
    parts = partition.dirichlet_client(labels, k, alpha, seed=0)
    _assert_partition(parts, labels.size, k)
    assert {p.size for p in parts} == {n_k}
    p = np.full(num_labels, 1 / num_labels)
    var_q = p * (1 - p) / (alpha + 1)
    want = np.sum(p**2 + var_q + (p * (1 - p) - var_q) / n_k)
    hist = np.stack([np.bincount(labels[i], minlength=num_labels) / n_k for i in parts[:40]])
    # Over 20 seeds this mean is within 7% (1 sd) of `want` at alpha = 1, 3% at 0.1 and 10.
    assert np.mean(np.sum(hist**2, axis=1)) == pytest.approx(want, rel=0.2)
    # E[q^_kc] = p_c: no label is favoured (4.5 standard errors of a 40-client mean).
    se = np.sqrt((var_q + (p * (1 - p) - var_q) / n_k) / 40)
    np.testing.assert_allclose(hist.mean(axis=0), p, atol=4.5 * se.max())


def test_dirichlet_client_uses_the_global_prior_and_handles_exhaustion():
    # Skewed global label frequencies (60% / 30% / 10%) and a tiny alpha: clients are nearly
    # pure, pools run out, and yet every example is placed once with equal client sizes.
    labels = np.random.default_rng(2).permutation(np.repeat([0, 1, 2], [360, 180, 60]))
    for alpha in (0.01, 1.0, 1e4):
        parts = partition.dirichlet_client(labels, 12, alpha, seed=3)
        _assert_partition(parts, labels.size, 12)
        assert {p.size for p in parts} == {50}
    # With alpha -> inf, q_k -> p: every client's mix is the global one (hypergeometric noise).
    hist = np.stack([np.bincount(labels[i], minlength=3) / 50 for i in parts])
    np.testing.assert_allclose(hist.mean(axis=0), [0.6, 0.3, 0.1], atol=1e-12)  # all used
    assert np.abs(hist - [0.6, 0.3, 0.1]).max() < 0.25


@pytest.mark.parametrize('alpha', [0.5, 5.0])
def test_quantity_skew_size_dispersion_and_global_label_mix(alpha):
    # Sizes: n_k - m = Dir(alpha 1_K) share of (n - K m), so sd(n_k) = (n - K m) *
    # sqrt((1/K)(1 - 1/K)/(K alpha + 1)). Labels: membership is uniformly random, so client k's
    # label counts are hypergeometric around the global mix: the Pearson statistic
    # n_k sum_c (q^_kc - p_c)^2 / p_c has mean (L - 1)(n - n_k)/(n - 1).
    num_labels, n, k, m = 10, 40_000, 50, 20
    labels = np.random.default_rng(4).permutation(np.repeat(np.arange(num_labels), n // num_labels))
    sds, chi = [], []
    for seed in range(4):
        parts = partition.quantity_skew(n, k, alpha, seed, min_size=m)
        _assert_partition(parts, n, k)
        sizes = np.array([p.size for p in parts])
        assert sizes.min() >= m
        sds.append(sizes.std(ddof=1))
        for part in parts:
            q = np.bincount(labels[part], minlength=num_labels) / part.size
            stat = part.size * np.sum((q - 0.1)**2 / 0.1)
            chi.append(stat / ((num_labels - 1) * (n - part.size) / (n - 1)))
    want_sd = (n - k * m) * np.sqrt(_dir_marginal_var(1 / k, k * alpha))
    # Over 8 repeats both ratios below are 1.00 +- 0.05 (1 sd).
    assert np.mean(sds) == pytest.approx(want_sd, rel=0.15)
    assert np.mean(chi) == pytest.approx(1.0, rel=0.15)


def _scattered_clients(n=400, num_clients=5, seed=0):
    """Windows dealt to clients in runs of random length (a topic partition's shape)."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(rng.integers(0, num_clients, n // 4), 4)  # runs of 4 consecutive windows
    return [np.flatnonzero(owner == k) for k in range(num_clients)]


def test_document_split_holds_out_whole_documents_no_train_window_touches():
    """Whole documents go to test; no train window is a test window's pool neighbour (windows
    overlap by one token); the split is deterministic and about test_fraction of each client."""
    parts, doc_of = _scattered_clients(), np.arange(400) // 8
    train, test = partition.local_split_documents(parts, doc_of, 0.2, seed=3)
    for idx, tr, te in zip(parts, train, test):
        assert te.size > 0 and tr.size > 0
        assert set(tr) | set(te) <= set(idx) and not set(tr) & set(te)
        assert (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
        held = set(doc_of[te])
        assert not held & set(doc_of[tr])  # no document on both sides
        assert not (set(tr + 1) | set(tr - 1)) & set(te)  # no train window touches a test one
        assert te.size >= round(0.2 * idx.size)
        assert te.size - max(np.sum(doc_of[idx] == d) for d in held) < round(0.2 * idx.size)
    again = partition.local_split_documents(parts, doc_of, 0.2, seed=3)
    assert _same(train, again[0]) and _same(test, again[1])
    # The window split of the same clients puts test windows next to train windows (the leak).
    w_train, w_test = partition.local_split(parts, 0.2, seed=3)
    assert any((set(tr + 1) | set(tr - 1)) & set(te) for tr, te in zip(w_train, w_test))


def test_document_split_keeps_a_one_document_client_for_training():
    train, test = partition.local_split_documents([np.arange(8), np.arange(8, 24)],
                                                  np.arange(24) // 8,
                                                  0.3,
                                                  seed=0)
    np.testing.assert_array_equal(train[0], np.arange(8))
    assert test[0].size == 0
    assert test[1].size == 8 and train[1].size == 7  # one document each; the guard drops one
    zero = partition.local_split_documents([np.arange(24)], np.arange(24) // 8, 0.0, seed=0)
    assert zero[1][0].size == 0 and zero[0][0].size == 24
