"""Client splits over example indices 0..n-1 (IID and non-IID).

Every split returns a list of ``num_clients`` sorted int64 index arrays that together cover
``range(n)`` exactly once, and is a deterministic function of its arguments (``seed`` feeds one
``np.random.default_rng``). K = num_clients, L = number of distinct labels (or topics).

* ``iid``: a random permutation cut into near-equal parts (sizes differ by at most 1).
* ``shards``: contiguous blocks in the original order (for text: each client owns a stretch).
* ``quantity`` (quantity skew only): random membership, so every client's label mix is the
  global one up to sampling noise; sizes n_k = min_size + Dirichlet(alpha * 1_K) share of the rest.
* ``dirichlet_label`` (per label, over clients; Yurochkin et al. 2019, the scheme of Flower
  Datasets' ``DirichletPartitioner``): for each label c, p_c ~ Dir(alpha * 1_K) splits that
  label's examples over the clients. Label skew AND strong size skew (client k's size is
  sum_c p_ck |I_c|): small alpha -> few labels per client and very uneven sizes.
* ``dirichlet_client`` (per client, over labels; Hsu, Qi & Brown 2019): every client has the
  same size n/K and its own class mix q_k ~ Dir(alpha * prior), prior = the global label
  frequencies; its examples are drawn from the remaining pool by q_k without replacement.
  Label skew only: small alpha -> each client concentrated on few labels.
* ``k_classes``: pathological split: every client holds examples of exactly k labels.
* ``local_split``: each client's own train/test split, for personalization metrics.
* ``label_histogram``: per-client label counts of a split (the label-skew figure).

Errors are one-line ValueErrors that name the offending parameter: as itself, or by the caller's
label when the function is given ``names`` (parameter -> label, e.g. ``{'alpha':
'data.partition.alpha', 'num_clients': 'fed.num_clients'}``; a parameter not in it keeps its own
name).
"""
from typing import Mapping, Optional

import numpy as np

KINDS = ('iid', 'shards', 'quantity', 'dirichlet_label', 'dirichlet_client', 'k_classes')
LABELED_KINDS = ('dirichlet_label', 'dirichlet_client', 'k_classes')  # these need labels

Names = Optional[Mapping[str, str]]


def _namer(names: Names):
    """``name(param)``: the label errors give ``param``, the caller's (``names``) or its own."""
    names = dict(names or {})
    return lambda param: names.get(param, param)


def _check_clients(n, num_clients, name):
    """num_clients is an integer in [1, n]."""
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= n:
        raise ValueError(f"{name('num_clients')}={num_clients!r}: must be an integer in "
                         f"[1, n={n}]")


def _check_alpha(alpha, name):
    """alpha is a finite number > 0."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name('alpha')}={alpha!r}: must be a finite number > 0")


def _check_min_size(n, num_clients, min_size, name):
    """min_size is an integer in [0, n / num_clients]."""
    if not isinstance(min_size, (int, np.integer)) or not 0 <= min_size * num_clients <= n:
        raise ValueError(f"{name('min_size')}={min_size!r}: must be an integer in "
                         f"[0, n / {name('num_clients')} = {n // max(num_clients, 1)}]")


def _check_test_fraction(test_fraction, name):
    """test_fraction is in [0, 1)."""
    if not np.isfinite(test_fraction) or not 0 <= test_fraction < 1:
        raise ValueError(f"{name('test_fraction')}={test_fraction!r}: must be in [0, 1)")


def _labels(labels):
    """labels as a 1-D integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                         f"{labels.shape}")
    return labels


def _finish(parts):
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _apportion(total, p):
    """Integers >= 0 summing to ``total``, proportional to p (largest remainder method)."""
    raw = np.asarray(p, np.float64) * total
    out = np.floor(raw).astype(np.int64)
    rest = total - out.sum()
    out[np.argsort(-(raw - out), kind='stable')[:rest]] += 1
    return out


def iid(n: int, num_clients: int, seed: int, *, names: Names = None) -> list:
    """Uniformly random split into near-equal parts (sizes floor or ceil of n / num_clients).
    Checks num_clients in [1, n]."""
    _check_clients(n, num_clients, _namer(names))
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_clients))


def shards(n: int, num_clients: int, *, names: Names = None) -> list:
    """Contiguous blocks: client k gets the k-th of num_clients near-equal stretches. Checks
    num_clients in [1, n]."""
    _check_clients(n, num_clients, _namer(names))
    return _finish(np.array_split(np.arange(n), num_clients))


def quantity_skew(n: int,
                  num_clients: int,
                  alpha: float,
                  seed: int,
                  min_size: int = 1,
                  *,
                  names: Names = None) -> list:
    """Random membership with skewed sizes: n_k = min_size + round(q_k * (n - K*min_size)),
    q ~ Dir(alpha * 1_K) (rounded by largest remainder so that sum_k n_k = n). Checks
    num_clients in [1, n], alpha finite > 0 and min_size in [0, n / num_clients]."""
    name = _namer(names)
    _check_clients(n, num_clients, name)
    _check_alpha(alpha, name)
    _check_min_size(n, num_clients, min_size, name)
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(num_clients, float(alpha)))
    sizes = min_size + _apportion(n - min_size * num_clients, q)
    perm = rng.permutation(n)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def dirichlet_label(labels,
                    num_clients: int,
                    alpha: float,
                    seed: int,
                    min_size: int = 1,
                    max_tries: int = 100,
                    *,
                    names: Names = None) -> list:
    """Per-label Dirichlet split over clients (Yurochkin et al. 2019; Flower's
    DirichletPartitioner): label skew with strong size skew.

    For each label c (shuffled examples I_c), draw p_c ~ Dir(alpha * 1_K) and give client k the
    slice I_c[floor(P_{k-1} |I_c|) : floor(P_k |I_c|)], P_k = sum_{j<=k} p_cj, so the share of
    label c held by client k is p_ck up to rounding. If some client ends with fewer than
    ``min_size`` examples, redraw everything from the same generator, up to ``max_tries``
    times, then raise ``ValueError``. Checks num_clients in [1, n], alpha finite > 0, min_size in
    [0, n / num_clients] and max_tries >= 1.
    """
    name = _namer(names)
    labels = _labels(labels)
    n = labels.shape[0]
    _check_clients(n, num_clients, name)
    _check_alpha(alpha, name)
    _check_min_size(n, num_clients, min_size, name)
    if not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"{name('max_tries')}={max_tries!r}: must be an integer >= 1")
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_label:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        sizes = [sum(piece.size for piece in part) for part in parts]
        if min(sizes) >= min_size:
            return _finish([np.concatenate(part) for part in parts])
    raise ValueError(f"{name('alpha')}={alpha!r}: no Dirichlet draw in {max_tries} tries "
                     f"gave every one of {name('num_clients')}={num_clients} clients >= "
                     f"{name('min_size')}={min_size} examples; raise alpha or lower them")


def _fill_counts(rng, size: int, q: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Per-label counts [L] of ``size`` draws by q, none beyond what is ``left`` of each label.

    counts ~ Multinomial(size, q); the draws that overflow a label's remaining examples are
    drawn again from q renormalised over the labels that still have examples, until all fit.
    """
    counts = np.zeros_like(left)
    todo, q = size, q.copy()
    while todo:
        room = left - counts
        q = np.where(room > 0, q, 0.0)
        if q.sum() <= 0:  # q_k put no mass on any label that is left: take the prior over them
            q = (room > 0).astype(np.float64)
        counts += np.minimum(rng.multinomial(todo, q / q.sum()), room)
        todo = size - counts.sum()
    return counts


def dirichlet_client(labels,
                     num_clients: int,
                     alpha: float,
                     seed: int,
                     *,
                     names: Names = None) -> list:
    """Per-client Dirichlet class mix with equal client sizes (Hsu, Qi & Brown 2019).

    prior p_c = (examples of label c) / n. Clients in order k = 0..K-1 each draw
    q_k ~ Dir(alpha * p) and take n_k in {floor(n/K), ceil(n/K)} examples (sum_k n_k = n): the
    per-label counts are Multinomial(n_k, q_k), and each label's examples are taken without
    replacement from that label's shuffled remaining pool.
    Exhaustion: draws that would need more examples of a label than remain are re-drawn from q_k
    renormalised over the labels still available (uniformly over them if q_k has no mass
    there). So the first clients follow q_k exactly and the last ones take what is left:
    every example is used once and every client has its n_k.
    Concentration: E[q_kc] = p_c, Var[q_kc] = p_c (1 - p_c) / (alpha + 1).
    Checks num_clients in [1, n] and alpha finite > 0.
    """
    name = _namer(names)
    labels = _labels(labels)
    n = labels.shape[0]
    _check_clients(n, num_clients, name)
    _check_alpha(alpha, name)
    rng = np.random.default_rng(seed)
    values, inverse = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(values.size)]
    left = np.array([p.size for p in pools], np.int64)
    prior = left / n
    sizes = [part.size for part in np.array_split(np.arange(n), num_clients)]
    taken = np.zeros_like(left)
    parts = []
    for size in sizes:
        q = rng.dirichlet(float(alpha) * prior)
        counts = _fill_counts(rng, size, q, left - taken)
        parts.append(
            np.concatenate([pools[c][taken[c]:taken[c] + counts[c]] for c in range(values.size)]))
        taken += counts
    return _finish(parts)


def k_classes(labels, num_clients: int, k: int, seed: int, *, names: Names = None) -> list:
    """Pathological split: every client holds examples of exactly k distinct labels.

    Explicit assignment: with the L labels in a seeded random order pi, client j holds labels
    pi[(j*k + i) mod L] for i < k (distinct because k <= L; every label is held when
    num_clients * k >= L, each by floor or ceil of num_clients*k/L clients). Each label's
    shuffled examples are then cut into near-equal parts among its holders. Raises
    ``ValueError`` when some label has fewer examples than holders (a holder would get none).
    Checks num_clients in [1, n], k in [1, L] and num_clients * k >= L.
    """
    name = _namer(names)
    labels = _labels(labels)
    n = labels.shape[0]
    _check_clients(n, num_clients, name)
    values = np.unique(labels)
    num_labels = values.size
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_labels:
        raise ValueError(f"{name('k')}={k!r}: must be an integer in [1, {num_labels}] "
                         f"(number of labels)")
    if num_clients * k < num_labels:
        raise ValueError(f"{name('k')}={k}: {name('num_clients')} * k = {num_clients * k} must "
                         f"be >= {num_labels} labels so that every example has a client")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_labels)
    holders = [[] for _ in range(num_labels)]
    for j in range(num_clients):
        for i in range(k):
            holders[order[(j * k + i) % num_labels]].append(j)
    parts = [[] for _ in range(num_clients)]
    for c in range(num_labels):
        idx = rng.permutation(np.flatnonzero(labels == values[c]))
        if idx.size < len(holders[c]):
            raise ValueError(f"{name('k')}={k}: label {values[c]} has {idx.size} examples "
                             f"for {len(holders[c])} clients; lower k or {name('num_clients')}")
        for j, piece in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[j].append(piece)
    return _finish([np.concatenate(part) for part in parts])


def local_split(client_indices, test_fraction: float, seed: int, *, names: Names = None):
    """Split each client's examples into local (train, test), both lists of sorted int64 arrays.

    For a client with n_k examples, test gets round(test_fraction * n_k), but at least 1 when
    test_fraction > 0 and n_k >= 2, and at most n_k - 1 so train keeps at least 1 example.
    Checks test_fraction in [0, 1).
    """
    _check_test_fraction(test_fraction, _namer(names))
    rng = np.random.default_rng(seed)
    train, test = [], []
    for idx in client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        n_k = idx.size
        n_test = int(round(test_fraction * n_k))
        if test_fraction > 0 and n_k >= 2:
            n_test = max(n_test, 1)
        n_test = min(n_test, max(n_k - 1, 0))
        perm = rng.permutation(idx)
        test.append(np.sort(perm[:n_test]))
        train.append(np.sort(perm[n_test:]))
    return train, test


LOCAL_TEST_UNITS = ('window', 'document')


def local_split_documents(client_indices,
                          doc_of,
                          test_fraction: float,
                          seed: int,
                          *,
                          names: Names = None):
    """Split each client's examples into local (train, test) by whole documents, so that no test
    text is also trained on: lists of sorted int64 arrays.

    ``doc_of`` int [M]: the document of every pool example (consecutive windows of one text
    share one id; ids increase along the text). Per client, its documents in a random order go
    to test until test holds >= round(test_fraction * n_k) examples (at least one document when
    test_fraction > 0 and the client has >= 2 documents; at least one document stays in train).
    Windows overlap their neighbours by one token, so a train window whose pool neighbour
    (index +-1) is a test window of another document is dropped from train (the guard);
    a client with one document keeps it for training and has no test set.
    Checks test_fraction in [0, 1).
    """
    _check_test_fraction(test_fraction, _namer(names))
    doc_of = np.asarray(doc_of)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for idx in client_indices:
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        docs = np.unique(doc_of[idx])
        chosen = []
        if test_fraction > 0 and docs.size >= 2:
            target, held = int(round(test_fraction * idx.size)), 0
            for d in rng.permutation(docs)[:docs.size - 1]:
                if chosen and held >= target:
                    break
                chosen.append(d)
                held += int(np.sum(doc_of[idx] == d))
        in_test = np.isin(doc_of[idx], chosen)
        held_out = idx[in_test]
        touching = np.isin(idx - 1, held_out) | np.isin(idx + 1, held_out)
        test.append(held_out)
        train.append(idx[~in_test & ~touching])
    return train, test


def make(kind: str,
         n: int,
         num_clients: int,
         seed: int,
         labels=None,
         alpha: float = 0.5,
         k: int = 2,
         min_size: int = 1,
         *,
         names: Names = None) -> list:
    """Dispatch on ``kind``, one of KINDS (the split's own checks follow).

    The LABELED_KINDS need ``labels`` (int [n], e.g. topic_labels for text). ``min_size``
    applies to 'quantity' and 'dirichlet_label' (the kinds with random sizes). Checks kind in
    KINDS and, for the LABELED_KINDS, labels of shape (n,).
    """
    name = _namer(names)
    if kind == 'dirichlet':
        raise ValueError(f"{name('kind')}='dirichlet' is ambiguous: use 'dirichlet_label' "
                         "(per-label shares over clients, size skew) or 'dirichlet_client' "
                         "(Hsu et al. 2019: per-client class mix, equal sizes)")
    if kind not in KINDS:
        raise ValueError(f"{name('kind')}={kind!r}: must be one of {KINDS}")
    if kind in LABELED_KINDS:
        if labels is None:
            raise ValueError(f"{name('kind')}={kind!r}: needs labels (int [n])")
        if np.shape(labels) != (n, ):
            raise ValueError(f"{name('kind')}={kind!r}: labels must have shape ({n},), got "
                             f"{np.shape(labels)}")
    if kind == 'iid':
        return iid(n, num_clients, seed, names=names)
    if kind == 'shards':
        return shards(n, num_clients, names=names)
    if kind == 'quantity':
        return quantity_skew(n, num_clients, alpha, seed, min_size, names=names)
    if kind == 'dirichlet_label':
        return dirichlet_label(labels, num_clients, alpha, seed, min_size, names=names)
    if kind == 'dirichlet_client':
        return dirichlet_client(labels, num_clients, alpha, seed, names=names)
    return k_classes(labels, num_clients, k, seed, names=names)


def label_histogram(labels, client_indices, num_classes: int) -> np.ndarray:
    """Per-client label counts.

    Args:
      labels: int [N], values in [0, num_classes).
      client_indices: sequence of K integer index arrays into `labels` (one per client).
      num_classes: number of classes.
    Returns:
      int64 [K, num_classes], hist[k, c] = #{i in client_indices[k] : labels[i] = c}.
    """
    labels = np.asarray(labels)
    if int(num_classes) < 1:
        raise ValueError(f'label_histogram: num_classes must be >= 1, got {num_classes}')
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f'label_histogram: labels must be 1-d in [0, {num_classes})')
    hist = np.zeros((len(client_indices), int(num_classes)), np.int64)
    for k, ix in enumerate(client_indices):
        ix = np.asarray(ix, np.int64).reshape(-1)
        if ix.size and (ix.min() < 0 or ix.max() >= labels.size):
            raise ValueError(f'label_histogram: client {k} has indices outside [0, {labels.size})')
        hist[k] = np.bincount(labels[ix], minlength=num_classes)
    return hist
