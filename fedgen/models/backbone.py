"""A loaded pretrained backbone (:class:`Backbone`) and the checks every loader ends with.

Loaders (:mod:`fedgen.io.weights_hf`, :mod:`fedgen.io.weights_gguf`) return the model's
own param tree: the blocks stacked on a leading layer axis (Llama ``layers/...`` [L, ...], GPT
``h/...`` [L, ...]; :func:`fedgen.models.layers.stack_blocks`), whatever per-layer names the file
uses.
"""
from typing import NamedTuple

from fedgen.io import tokenizer as tokenizers_
from fedgen.models import gpt, llama


class Backbone(NamedTuple):
    """A loaded backbone: arch 'gpt2' | 'llama', its config, params and tokenizer (or None)."""
    arch: str
    config: gpt.GPTConfig | llama.LlamaConfig
    params: dict
    tokenizer: tokenizers_.Tokenizer | None


def finish(arch, cfg, params, tok, dtype, field) -> Backbone:
    """Checks the tokenizer against the embedding rows and casts Llama weights to ``dtype``."""
    rows = params['embed_tokens' if arch == 'llama' else 'wte']['embedding'].shape[0]
    if tok is not None:
        tokenizers_.check_vocab(tok, rows, field)
    if arch == 'llama':
        llama.validate(cfg, section='model.')
        params = llama.cast_frozen(params, dtype)
    elif dtype != 'float32':
        raise ValueError(f'model.dtype={dtype!r} is implemented for Llama backbones only')
    return Backbone(arch, cfg, params, tok)
