"""The PTB task's language model: which decoder, its weights, and how PTB text becomes its tokens.

``model.source`` (see :mod:`fedgen.io.weights`) chooses between two kinds of backbone:

* ``'local'``: a decoder of the ``model.*`` geometry (``model.name`` 'gpt' or 'llama') over PTB's
  10k-word vocabulary, pre-trained by fedgen on the public portion (``pretrain.steps``). Its tokens
  are PTB's words, each newline the word ``<eos>``, which also starts every scored stream.
* ``'hf_dir:<path>'``, ``'gguf:<path>'``, ``'smollm2-135m'``: a pretrained GPT-2 or Llama checkpoint
  with its own subword tokenizer. PTB's raw text (lower-cased, ``<unk>``, ``N``) is tokenized as
  is, after the tokenizer's document-start id (``weights.document_start_id``: SmolLM2's
  ``<|endoftext|>``, id 0; its GGUF BOS id 1 is the chat marker ``<|im_start|>``, which raises a
  short paragraph's perplexity by about 20%).

Either way training windows are ``data.seq_len`` tokens and evaluation is the word-level
perplexity of :mod:`fedgen.metrics.perplexity`, so word and subword models are comparable.
"""
import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np

from fedgen.data import ptb
from fedgen.models import gpt, llama
from fedgen.io import weights

ARCHS = ('gpt', 'llama')
# The param tree's layout, part of a pre-trained backbone's cache key (the task recipes): the
# decoders' blocks stacked on a layer axis (``h/...`` [L, ...], ``layers/...`` [L, ...]), so a cache
# written with per-layer subtrees (``h_0``, ``layers_0``) is rebuilt rather than read.
PARAM_LAYOUT = 'blocks-stacked'


@dataclasses.dataclass(frozen=True)
class LM:
    """A PTB language model.

    arch: 'gpt' | 'llama'; module: the flax decoder; config: its GPTConfig / LlamaConfig;
    params: the loaded frozen weights (jax arrays), or None when fedgen pre-trains them (source
    'local'); encode(text) -> ids int32 [N]; decode(ids) -> text; start_id: the unscored first
    token of a stream; word_level: tokens are PTB words; describe: what to log about it.
    """
    arch: str
    module: nn.Module
    config: Any
    params: Optional[dict]
    encode: Callable[[str], np.ndarray]
    decode: Callable[[Any], str]
    start_id: int
    word_level: bool
    describe: dict

    @property
    def n_positions(self) -> int:
        return self.config.n_positions

    def init(self, rng: jax.Array) -> dict:
        """The backbone before pre-training: the loaded weights, or a random init."""
        if self.params is not None:
            return self.params
        if self.arch == 'llama':
            return llama.init_params(self.config, rng)
        return gpt.init_params(self.config, rng)

    def generate(self, variables: dict, prompt: jax.Array, steps: int, rng: jax.Array):
        """[B, P] -> [B, P + steps] sampled tokens (Llama: KV cache; GPT: fixed buffer)."""
        gen = llama.generate if self.arch == 'llama' else gpt.generate
        return gen(self.module, variables, prompt, steps, rng)


def local_config(m, vocab_size: int, lora_alpha: float):
    """The model.* geometry as a GPTConfig or LlamaConfig (validated, one-line errors)."""
    if m.name == 'gpt':
        if m.dtype != 'float32' or m.remat:
            raise ValueError(f"model.dtype / model.remat are implemented for model.name='llama' "
                             f'only, got dtype={m.dtype!r}, remat={m.remat}')
        cfg = gpt.GPTConfig(vocab_size=vocab_size,
                            n_positions=m.n_positions,
                            n_embd=m.n_embd,
                            n_layer=m.n_layer,
                            n_head=m.n_head,
                            lora_alpha=lora_alpha)
        gpt.validate(cfg, section='model.')
        return cfg
    cfg = llama.LlamaConfig(vocab_size=vocab_size,
                            n_positions=m.n_positions,
                            n_embd=m.n_embd,
                            n_layer=m.n_layer,
                            n_head=m.n_head,
                            n_kv_head=m.n_kv_head or m.n_head,
                            n_inner=m.n_inner or 4 * m.n_embd,
                            rope_theta=float(m.rope_theta),
                            rms_norm_eps=float(m.rms_norm_eps),
                            tie_word_embeddings=bool(m.tie_word_embeddings),
                            lora_alpha=lora_alpha,
                            dtype=m.dtype,
                            remat=bool(m.remat))
    llama.validate(cfg, section='model.')
    return cfg


def check_name(m) -> str:
    """model.source's kind, after checking model.name (before any loading)."""
    if m.name not in ARCHS:
        raise ValueError(f'model.name must be one of {ARCHS}, got {m.name!r}')
    return weights.parse_source(m.source, 'model.source')[0]


def word_vocab(text: str, max_vocab: int = 0) -> tuple:
    """The word vocabulary of ``text``: :func:`fedgen.data.ptb.build_vocab` (by descending count,
    ties alphabetical) when ``max_vocab`` is 0 (PTB: its own 10k words, ``<unk>`` included).

    ``max_vocab`` > 0 caps it at ``max_vocab`` entries and makes sure it holds ``<unk>`` (for words
    never seen in ``text``): ``<eos>`` and the ``max_vocab - 2`` most frequent other words are
    kept, every other word counts as ``<unk>``, and the result is ranked again by count (``<unk>``
    last when nothing was mapped to it).
    """
    tokens = ptb.words(text)
    if max_vocab == 0:
        return ptb.build_vocab(tokens)
    if not (isinstance(max_vocab, int) and max_vocab >= 2):
        raise ValueError(f'data.vocab_size must be 0 or an int >= 2 (<eos> and <unk>), got '
                         f'{max_vocab!r}')
    ranked = [w for w in ptb.build_vocab(tokens) if w not in (ptb.UNK, ptb.EOS)]
    keep = set(ranked[:max_vocab - 2]) | {ptb.EOS}
    vocab = ptb.build_vocab(w if w in keep else ptb.UNK for w in tokens)
    return vocab if ptb.UNK in vocab else vocab + (ptb.UNK, )


def build(m, texts: dict, lora_alpha: float, max_vocab: int = 0) -> LM:
    """The LM that settings ``m`` (model.*) names, with ``texts`` {split: text}: a 'local'
    model's word vocabulary comes from ``texts['train']`` (capped at ``max_vocab`` words when
    > 0, see :func:`word_vocab`); a checkpoint brings its own tokenizer."""
    kind = check_name(m)
    if kind == 'local':
        vocab = word_vocab(texts['train'], max_vocab)
        index = {w: i for i, w in enumerate(vocab)}
        cfg = local_config(m, len(vocab), lora_alpha)
        module = llama.Llama(cfg) if m.name == 'llama' else gpt.GPT(cfg)
        return LM(arch=m.name,
                  module=module,
                  config=cfg,
                  params=None,
                  encode=lambda text: ptb.encode(text, vocab, index),
                  decode=lambda ids: ptb.decode(ids, vocab),
                  start_id=index[ptb.EOS],
                  word_level=True,
                  describe={
                      'source': 'local',
                      'arch': m.name,
                      'vocab': len(vocab)
                  })
    bb = weights.load(m.source, lora_alpha, m.dtype, bool(m.remat), 'model.source')
    arch = 'llama' if bb.arch == 'llama' else 'gpt'
    if arch != m.name:
        raise ValueError(f'model.name={m.name!r} but model.source={m.source!r} holds a {bb.arch} '
                         f"checkpoint (set model.name='{arch}')")
    if bb.tokenizer is None:
        raise ValueError(f'model.source={m.source!r}: the checkpoint has no tokenizer '
                         '(tokenizer.json, or vocab.json + merges.txt) to tokenize PTB with')
    tok = bb.tokenizer
    module = llama.Llama(bb.config) if arch == 'llama' else gpt.GPT(bb.config)
    size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(bb.params))
    return LM(
        arch=arch,
        module=module,
        config=bb.config,
        params=weights.to_device(bb.params),  # one copy, not host + device
        encode=tok.encode,
        decode=tok.decode,
        start_id=weights.document_start_id(tok),
        word_level=False,
        describe={
            'source': m.source,
            'arch': bb.arch,
            'parameters': size,
            'vocab': tok.vocab_size,
            'dtype': m.dtype
        })


def stream(lm: LM, text: str) -> np.ndarray:
    """[start_id] + encode(text): int32 [N + 1], the start never scored."""
    return np.concatenate([[lm.start_id], lm.encode(text)]).astype(np.int32)
