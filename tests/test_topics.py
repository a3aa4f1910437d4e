"""Tests for fedgen.data.topics: TF-IDF + spherical k-means topic labels."""
import numpy as np
import pytest

from fedgen.data import topics

L = 9  # window length L + 1 = 10
DOC = 4  # windows per pseudo-document


def _two_topic_corpus(num_docs=40, seed=0):
    """Documents alternate in random order between word ids 10..59 and 60..109; ids 0..4 are
    frequent 'stop words' shared by both. Returns windows [num_docs*DOC, L+1] and doc truth."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, num_docs)
    rows = []
    for t in truth:
        for _ in range(DOC):
            content = rng.integers(10 + 50 * t, 60 + 50 * t, L + 1)
            stop = rng.integers(0, 5, L + 1)
            rows.append(np.where(rng.random(L + 1) < 0.5, stop, content))
    return np.stack(rows).astype(np.int32), truth


def test_separates_disjoint_vocabularies():
    w, truth = _two_topic_corpus()
    z = topics.topic_labels(w, 2, seed=0, doc_windows=DOC, vocab_size=110, stop_words=5)
    assert z.shape == (w.shape[0], ) and z.dtype == np.int32
    doc_z = z.reshape(-1, DOC)
    assert (doc_z == doc_z[:, :1]).all()  # a document's windows share its topic
    doc_z = doc_z[:, 0]
    # Perfect agreement with the truth up to renaming the two topics.
    assert (doc_z == truth).all() or (doc_z == 1 - truth).all()


def test_deterministic_and_in_range():
    w, _ = _two_topic_corpus(num_docs=30, seed=1)
    a = topics.topic_labels(w, 5, seed=3, doc_windows=DOC, vocab_size=110, stop_words=5)
    b = topics.topic_labels(w, 5, seed=3, doc_windows=DOC, vocab_size=110, stop_words=5)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 5
    one = topics.topic_labels(w, 1, seed=0, doc_windows=DOC, vocab_size=110)
    assert (one == 0).all()


def test_partial_last_document_and_all_topics_used():
    w, _ = _two_topic_corpus(num_docs=10, seed=2)
    w = w[:-1]  # 39 windows: last document has 3 windows
    z = topics.topic_labels(w, 10, seed=0, doc_windows=DOC, vocab_size=110, stop_words=5)
    assert z.shape == (39, )
    # k = number of documents: k-means++ picks every document as a centre -> all topics used.
    assert np.unique(z).size == 10


def test_tfidf_rows_unit_and_stop_words_dropped():
    w, _ = _two_topic_corpus(num_docs=12, seed=4)
    x = topics.tfidf(w, DOC, 110, stop_words=5)
    assert x.shape == (12, 110)
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(axis=1)).A.ravel(), 1.0, rtol=1e-5)
    assert x[:, :5].nnz == 0  # ids 0..4 are the five most frequent words


def test_validation():
    w, _ = _two_topic_corpus(num_docs=5)
    with pytest.raises(ValueError, match=r'^num_topics=6: must be an integer in \[1, 5\]'):
        topics.topic_labels(w, 6, seed=0, doc_windows=DOC, vocab_size=110)
    with pytest.raises(ValueError, match=r'^data\.partition\.num_topics=0: '):
        topics.topic_labels(w,
                            0,
                            seed=0,
                            doc_windows=DOC,
                            vocab_size=110,
                            section='data.partition.')
    with pytest.raises(ValueError, match=r'^doc_windows=0: must be an integer >= 1$'):
        topics.topic_labels(w, 2, seed=0, doc_windows=0, vocab_size=110)
    with pytest.raises(ValueError, match='vocab_size'):
        topics.topic_labels(w, 2, seed=0, doc_windows=DOC, vocab_size=50)
