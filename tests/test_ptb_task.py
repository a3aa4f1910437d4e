"""The PTB task over any backbone: model.source 'local' (word-level GPT or Llama pre-trained here)
and 'hf_dir:' (a pretrained checkpoint with its own subword tokenizer); the word-level
sliding-window perplexity; the chunked cross-entropy; lora.init_from; and the one-line errors."""
import dataclasses
import os

import jax
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from experiments import compare
from experiments import translate
from experiments import train
from fedgen.lora import adapters as lora
from fedgen.tasks import objectives
from fedgen.lora import peft
from fedgen.io import tokenizer
from fedgen.data import ptb
from fedgen.metrics import perplexity
from fedgen.models import gpt, llama
from fedgen.io import checkpoint, weights_hf

import configs.ptb_fedgen_edge as base_config
from configs import ptb_smollm2_centralized, ptb_smollm2_fedavg_full
from configs import ptb_smollm2_fedgen_edge as smollm2_config

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ['v 1', 'w 1', 'Ġ v', 'Ġ w']
EXTRA = ['v1', 'w1', 'Ġv', 'Ġw', '<|endoftext|>']


def _config(corpus, arg='tiny', module=base_config, **fields):
    c = module.get_config(arg)
    c.data.source = corpus
    c.data.verify_md5 = False
    for path, value in fields.items():
        compare.set_field(c, path, value)
    return c


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
    """A random tiny Llama saved as a Hugging Face directory with a byte-level BPE tokenizer.json
    (vocabulary: the 256 byte characters, four merges, <|endoftext|>)."""
    d = tmp_path_factory.mktemp('hf_llama')
    vocab = {t: i for i, t in enumerate(ALPHABET + EXTRA)}
    tok = tokenizer.byte_level_bpe(vocab, [tuple(m.split()) for m in MERGES],
                                   special=['<|endoftext|>'])
    cfg = llama.LlamaConfig(vocab_size=len(vocab),
                            n_positions=64,
                            n_embd=16,
                            n_layer=2,
                            n_head=4,
                            n_kv_head=2,
                            n_inner=24)
    weights_hf.save_hf_dir(str(d), 'llama', cfg, llama.init_params(cfg, jax.random.PRNGKey(0)))
    tok.save(str(d / 'tokenizer.json'))
    return str(d)


def _hf_config(corpus, hf_dir, **fields):
    return _config(
        corpus, 'tiny', smollm2_config, **{
            'model.source': f'hf_dir:{hf_dir}',
            'data.seq_len': 16,
            'eval.window': 32,
            'eval.stride': 16,
            **fields
        })


def test_word_level_task_counts_ptb_words_and_reports_the_protocol(corpus):
    c = _config(corpus, **{'eval.subset_lines': 7})
    task = translate.spec(c).prepare_task()
    text = ptb.first_lines(ptb.load_texts(corpus, verify=False)['valid'], 7)
    words = len(text.split()) + 7
    assert task.info['eval'] == {
        'window': 16,
        'stride': 8,
        'text': 'first 7 lines of each split',
        'valid_words': words
    }
    params = task.init_backbone(jax.random.PRNGKey(0))
    got = task.evaluator('valid', {})({'params': params})
    assert (got['valid_window'], got['valid_stride'], got['valid_words']) == (16, 8, words)
    np.testing.assert_allclose(got['valid_loss'], np.log(got['valid_ppl']), rtol=1e-6)
    # Word-level: the words are the tokens, one <eos> per line, after a start <eos>.
    vocab = ptb.load_ptb(corpus, verify=False).vocab
    model = gpt.GPT(gpt.GPTConfig(**task.info['model']['config']))
    direct = perplexity.evaluator(lambda v, x, y: objectives.token_nll(model.apply(v, x), y),
                                  np.concatenate([[vocab.index('<eos>')],
                                                  ptb.encode(text, vocab)]), words, 16, 8, 4)
    np.testing.assert_allclose(direct({'params': params})['ppl'], got['valid_ppl'], rtol=1e-5)


def test_subword_task_from_an_hf_dir(corpus, hf_llama):
    """The checkpoint's tokenizer and weights, the stream after <|endoftext|>, the same PTB word
    count as the word-level task, and ce_chunk leaving every number unchanged."""
    c = _hf_config(corpus, hf_llama)
    task = translate.spec(c).prepare_task()
    assert task.info['model']['arch'] == 'llama' and task.info['model']['vocab'] == 261
    assert task.client_metric[0] == 'token_ppl'
    texts = ptb.load_texts(corpus, verify=False)
    sub = ptb.first_lines(texts['valid'], 20)
    assert task.info['eval']['valid_words'] == len(
        ptb.encode(sub,
                   ptb.load_ptb(corpus, False).vocab))
    first = task.valid['tokens'][0]
    assert first[0] == 260  # <|endoftext|> starts the stream
    tok = tokenizer.from_hf_dir(hf_llama)
    assert tok.decode(first[1:]) == tok.decode(tok.encode(sub)[:16])
    params = task.init_backbone(jax.random.PRNGKey(5))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))  # one copy, on device
    ref = weights_hf.load_hf_dir(hf_llama).params
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, ref)
    assert all(jax.tree.leaves(same))
    ev = task.evaluator('valid', {})({'params': params})
    assert (ev['valid_window'], ev['valid_stride']) == (32, 16) and np.isfinite(ev['valid_ppl'])
    batch = {'tokens': task.pool['tokens'][:3], 'weight': np.ones(3, np.float32)}
    l1 = task.loss_fn({'params': params}, batch, None)[0]
    for over in ({
            'model.ce_chunk': 7
    }, {
            'model.ce_vocab_chunk': 100
    }, {
            'model.ce_chunk': 7,
            'model.ce_vocab_chunk': 100
    }):
        chunked = translate.spec(_hf_config(corpus, hf_llama, **over)).prepare_task()
        ev2 = chunked.evaluator('valid', {})({'params': params})
        np.testing.assert_allclose(ev2['valid_ppl'], ev['valid_ppl'], rtol=1e-5, err_msg=str(over))
        l2 = chunked.loss_fn({'params': params}, batch, None)[0]
        np.testing.assert_allclose(l1, l2, rtol=1e-5, err_msg=str(over))
    assert len(task.sample({'params': params}, jax.random.PRNGKey(0))) == c.eval.num_samples


def test_lora_init_from_a_peft_export(corpus, hf_llama, tmp_path):
    """A run whose lora.init_from is a PEFT export starts from exactly that adapter; an export of
    another rank is a one-line error naming lora.rank."""
    bb = weights_hf.load_hf_dir(hf_llama)
    ad = lora.init(jax.random.PRNGKey(3), bb.params, 'llama_qv', 2)
    ad = jax.tree.map(lambda x: x + 0.1 * np.ones_like(x), ad)
    peft.export_adapter(str(tmp_path / 'ad'), 'llama', bb.params, ad, 16.0, hf_llama)
    c = _hf_config(corpus, hf_llama, **{'lora.init_from': str(tmp_path / 'ad')})
    r = train.setup(translate.spec(c), str(tmp_path / 'run'))
    got = r['state'].trainable['lora']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ad)
    c = _hf_config(corpus, hf_llama, **{'lora.init_from': str(tmp_path / 'ad'), 'lora.rank': 4})
    with pytest.raises(ValueError, match=r'lora.init_from: .* the run needs .*lora.rank=4'):
        train.setup(translate.spec(c), str(tmp_path / 'run2'))
    c = _hf_config(corpus, hf_llama, **{'lora.init_from': str(tmp_path / 'nothing')})
    with pytest.raises(ValueError, match='lora.init_from: .* holds no adapter_config.json'):
        train.setup(translate.spec(c), str(tmp_path / 'run3'))


def test_one_line_errors_before_loading(corpus, hf_llama):
    cases = [
        ({
            'eval.window': 17
        }, r'eval.window must be in \[2, model.n_positions=16\]'),
        ({
            'eval.stride': 20
        }, r'eval.stride must be in \[1, eval.window=16\]'),
        ({
            'model.source': 'hub:x'
        }, "model.source must be 'local'"),
        ({
            'model.name': 'rnn'
        }, 'model.name must be one of'),
        ({
            'model.ce_chunk': -1
        }, 'model.ce_chunk must be an int >= 0'),
        ({
            'model.ce_vocab_chunk': -1
        }, 'model.ce_vocab_chunk must be an int >= 0'),
        ({
            'data.partition.local_test_unit': 'sentence'
        }, r"data.partition.local_test_unit must be one of \('window', 'document'\)"),
    ]
    for fields, msg in cases:
        with pytest.raises(ValueError, match=msg):
            translate.spec(_config(corpus, **fields)).prepare_task()
    with pytest.raises(ValueError, match="model.name='gpt' but .* holds a llama checkpoint"):
        translate.spec(_hf_config(corpus, hf_llama, **{'model.name': 'gpt'})).prepare_task()
    with pytest.raises(ValueError, match=r'eval.window must be in \[2, model.n_positions=64\]'):
        translate.spec(_hf_config(corpus, hf_llama, **{'eval.window': 65})).prepare_task()


def test_document_local_split_trains_on_no_test_text(corpus):
    """data.partition.local_test_unit='document': each client's test windows are whole
    doc_windows-window documents and none of its train windows is their pool neighbour; the
    default window split has such neighbours."""
    leaks = {}
    for unit in ('window', 'document'):
        task = translate.spec(_config(corpus, **{'data.partition.local_test_unit':
                                                 unit})).prepare_task()
        assert sum(len(t) for t in task.client_test) > 0
        leaks[unit] = sum(
            len((set(tr + 1) | set(tr - 1)) & set(te))
            for tr, te in zip(task.client_train, task.client_test))
    assert leaks['document'] == 0 and leaks['window'] > 0


# A one-block Llama with GQA, for the LoRA rule and dtype tests.
TINY_LLAMA = llama.LlamaConfig(vocab_size=11,
                               n_positions=8,
                               n_embd=8,
                               n_layer=1,
                               n_head=2,
                               n_kv_head=1,
                               n_inner=8)


def test_a_target_rule_that_misses_lists_the_module_names():
    cfg = TINY_LLAMA
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError,
                       match='down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, '
                       'v_proj'):
        lora.target_paths(params, 'qv')


def test_bf16_backbone_trains_float32_adapters():
    cfg = dataclasses.replace(TINY_LLAMA, dtype='bfloat16')
    params = llama.cast_frozen(llama.init_params(cfg, jax.random.PRNGKey(0)), 'bfloat16')
    ad = lora.init(jax.random.PRNGKey(1), params, 'llama_qv', 2)
    assert {x.dtype for x in jax.tree.leaves(ad)} == {np.dtype('float32')}
    h = llama.Llama(cfg).apply({
        'params': params,
        'lora': ad
    },
                               np.zeros((1, 3), np.int32),
                               method='hidden')
    assert h.dtype == jax.numpy.bfloat16


def test_smollm2_tiny_config_trains_a_local_llama(corpus, tmp_path, capsys):
    """configs/ptb_smollm2_fedgen_edge.py:tiny end to end: a random 2-layer Llama pre-trained here
    on PTB words, federated LoRA on q and v, word-level PPL with its window and stride, samples
    through the KV-cache sampler."""
    summary = train.run(_config(corpus, 'tiny', smollm2_config), str(tmp_path / 'run'))
    assert summary['final_valid_ppl'] < summary['backbone_valid_ppl']
    for split in ('valid', 'test'):
        assert (summary[f'final_{split}_window'], summary[f'final_{split}_stride']) == (16, 8)
    assert summary['backbone_test_ppl'] > 0  # the zero-shot test PPL is in the summary
    out = capsys.readouterr().out
    lines = out.split('samples from the global model (final):\n')[1].splitlines()
    assert lines[0].startswith('  > ') and len(lines[0].split()) >= 2


def _flat(d, prefix=''):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


@pytest.mark.parametrize('arg', ['', 'cpu', 'tiny'])
def test_smollm2_baselines_differ_from_fedgen_edge_only_in_the_method(arg):
    """Same data, clients, rounds, steps and token budget: full FedAvg changes the algorithm and
    the client learning rate, centralized the algorithm (and at :cpu the learning rate: its
    pooled round takes every step on one model, and FedGen-Edge's 1e-2 diverged there)."""
    edge = _flat(smollm2_config.get_config(arg).to_dict())
    central = {'fed.algorithm'} | ({'fed.client_lr'} if arg == 'cpu' else set())
    for module, fields in ((ptb_smollm2_fedavg_full, {'fed.algorithm', 'fed.client_lr'}),
                           (ptb_smollm2_centralized, central)):
        other = _flat(module.get_config(arg).to_dict())
        assert other.keys() == edge.keys()
        assert {k for k in edge if edge[k] != other[k]} == fields


def test_smollm2_full_fedavg_trains_and_uploads_every_weight(corpus, tmp_path):
    """configs/ptb_smollm2_fedavg_full.py:tiny: every Llama weight is a client's upload, and the
    global model moves off the backbone."""
    summary = train.run(_config(corpus, 'tiny', ptb_smollm2_fedavg_full), str(tmp_path / 'full'))
    (name, ) = os.listdir(tmp_path / 'full' / 'backbone')
    backbone = checkpoint.load_tree(str(tmp_path / 'full' / 'backbone' / name), None, 'backbone')
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backbone))
    assert summary['algorithm'] == 'fedavg_full'
    assert summary['up_bytes_per_client_round'] == whole
    assert summary['final_valid_ppl'] != pytest.approx(summary['backbone_valid_ppl'], rel=1e-4)
