"""Cheap topic labels for text windows, used for the topic-skewed non-IID split.

Text has no class labels, so a Dirichlet "label" skew over text needs pseudo-labels. We take
consecutive windows as pseudo-documents (PTB is a stream of WSJ articles, so neighbouring windows
share a subject), describe each document by TF-IDF over its words, and cluster the documents
with spherical k-means. Every window gets its document's topic.

For document d and word v with count c[d, v] over D documents:
    tf[d, v]  = log(1 + c[d, v])                      (sublinear: repeats matter less)
    idf[v]    = log((1 + D) / (1 + df[v])) + 1        (df[v] = #documents containing v)
    x[d]      = tf[d] * idf / ||tf[d] * idf||_2
The ``stop_words`` most frequent ids over the whole corpus (for PTB: the, <unk>, <eos>, N, of,
...) and words found in a single document only are dropped before weighting: they carry syntax or
noise, not subject. Spherical k-means maximises sum_d <x[d], mu[z_d]> with unit-norm centroids:
    z_d   = argmax_k <x[d], mu_k>,     mu_k = normalise(sum_{d: z_d = k} x[d]).
It is seeded by spherical k-means++ (next centre drawn with probability proportional to
1 - max_k <x[d], mu_k>) and runs a fixed number of iterations, so it is deterministic in seed.
"""
import numpy as np
import scipy.sparse as sp


def _validate(windows, num_topics, doc_windows, vocab_size, stop_words, iters, section):
    """windows [M, L+1] integer ids in [0, vocab_size), doc_windows >= 1, num_topics in [1, number
    of documents], stop_words >= 0 and iters >= 1; returns the number of documents."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"topic_labels: windows must be [M, L+1] with L >= 1, got shape "
                         f"{windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"topic_labels: windows must hold integer ids, got {windows.dtype}")
    if not isinstance(doc_windows, (int, np.integer)) or doc_windows < 1:
        raise ValueError(f"{section}doc_windows={doc_windows!r}: must be an integer >= 1")
    num_docs = -(-windows.shape[0] // doc_windows)
    if not isinstance(num_topics, (int, np.integer)) or not 1 <= num_topics <= num_docs:
        raise ValueError(f"{section}num_topics={num_topics!r}: must be an integer in "
                         f"[1, {num_docs}] (number of {doc_windows}-window documents)")
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        raise ValueError(f"topic_labels: ids must be in [0, vocab_size={vocab_size}), got range "
                         f"[{windows.min()}, {windows.max()}]")
    if stop_words < 0 or iters < 1:
        raise ValueError(f"topic_labels: need stop_words >= 0 and iters >= 1, got "
                         f"{stop_words}, {iters}")
    return num_docs


def tfidf(windows, doc_windows, vocab_size, stop_words=100):
    """Row-normalised TF-IDF document matrix: scipy CSR [D, V], D = ceil(M / doc_windows).

    Document d holds the input tokens ``windows[d*doc_windows:(d+1)*doc_windows, :-1]`` (the last
    column repeats the next window's first token). All-zero rows stay zero.
    """
    tokens = np.asarray(windows)[:, :-1]
    m, length = tokens.shape
    doc = np.repeat(np.arange(m) // doc_windows, length)
    num_docs = -(-m // doc_windows)
    # coo -> csr sums duplicate (doc, word) entries: the count matrix c[d, v].
    counts = sp.coo_matrix((np.ones(doc.size, np.float32), (doc, tokens.reshape(-1))),
                           shape=(num_docs, vocab_size)).tocsr()
    totals = np.asarray(counts.sum(axis=0)).ravel()
    df = np.bincount(counts.indices, minlength=vocab_size)
    keep = df >= 2
    # Stable sort by -total so ties keep the lower id: deterministic.
    keep[np.argsort(-totals, kind='stable')[:stop_words]] = False
    idf = np.log((1.0 + num_docs) / (1.0 + df)) + 1.0
    weight = np.where(keep, idf, 0.0).astype(np.float32)
    x = counts.copy()
    x.data = np.log1p(x.data) * weight[x.indices]
    x.eliminate_zeros()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)).dot(x).tocsr().astype(np.float32)


def _kmeans_pp(x, k, rng):
    """Spherical k-means++ seeding: unit centroids [k, V] taken from rows of x."""
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    best = x.dot(x[chosen[0]].toarray().ravel())  # max cosine to a chosen centre, [D]
    for _ in range(1, k):
        dist = np.clip(1.0 - best, 0.0, None)
        dist[chosen] = 0.0
        if dist.sum() <= 0:  # fewer distinct documents than k: pick any unchosen one
            dist = np.ones(n)
            dist[chosen] = 0.0
        nxt = int(rng.choice(n, p=dist / dist.sum()))
        chosen.append(nxt)
        best = np.maximum(best, x.dot(x[nxt].toarray().ravel()))
    return x[chosen].toarray()


def spherical_kmeans(x, k, seed, iters=20):
    """Cluster the unit rows of CSR x [D, V] into k topics; returns int32 [D] in [0, k).

    Empty clusters are re-seeded with the document least similar to its centroid. Topic ids are
    renumbered by first appearance so the output does not depend on centroid order.
    """
    rng = np.random.default_rng(seed)
    mu = _kmeans_pp(x, k, rng)
    for _ in range(iters):
        sim = np.asarray(x.dot(mu.T))  # [D, k]
        z = sim.argmax(axis=1)
        sizes = np.bincount(z, minlength=k)
        for empty in np.flatnonzero(sizes == 0):
            far = int(np.argmin(sim[np.arange(sim.shape[0]), z]))
            z[far] = empty
            sim[far] = np.inf  # do not steal the same document twice
            sizes = np.bincount(z, minlength=k)
        onehot = sp.csr_matrix((np.ones(z.size, np.float32), (z, np.arange(z.size))),
                               shape=(k, z.size))
        mu = np.asarray(onehot.dot(x).todense())
        mu /= np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
    z = np.asarray(x.dot(mu.T)).argmax(axis=1)
    _, first = np.unique(z, return_index=True)
    order = np.unique(z)[np.argsort(first)]
    rename = np.zeros(k, np.int32)
    rename[order] = np.arange(order.size, dtype=np.int32)
    return rename[z]


def topic_labels(windows: np.ndarray,
                 num_topics: int,
                 seed: int,
                 doc_windows: int = 8,
                 vocab_size: int = None,
                 stop_words: int = 100,
                 iters: int = 20,
                 *,
                 section: str = '') -> np.ndarray:
    """Topic id per window: int32 [M] in [0, num_topics).

    windows: int [M, L+1] token windows (``ptb.windows``), in text order.
    Windows ``[d*doc_windows, (d+1)*doc_windows)`` form document d; documents are clustered by
    spherical k-means over TF-IDF (module docstring) and each window takes its document's topic.
    ``vocab_size`` defaults to ``windows.max() + 1``. About a second for 25k windows of 36 ids.
    Checks the windows' shape and ids, doc_windows >= 1 and num_topics in [1, documents].
    section: the caller's prefix for num_topics and doc_windows in error messages, e.g.
    'data.partition.'.
    """
    windows = np.asarray(windows)
    if vocab_size is None:
        vocab_size = int(windows.max()) + 1 if windows.size else 1
    _validate(windows, num_topics, doc_windows, vocab_size, stop_words, iters, section)
    x = tfidf(windows, doc_windows, vocab_size, stop_words)
    doc_topic = spherical_kmeans(x, int(num_topics), seed, iters)
    return doc_topic[np.arange(windows.shape[0]) // doc_windows].astype(np.int32)
