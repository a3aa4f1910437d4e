"""llama.cpp GGUF files of architecture llama: hyper-parameters, dequantized weights, tokenizer.

F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants Q2_K..Q6_K are dequantized to float32. A
4-bit file gives a frozen base of dequantized 4-bit weights, so LoRA over it is QLoRA-like (the
base carries the quantization error; the adapters are full precision). llama.cpp's converter
permutes the rows of Q and K within each head from Hugging Face's rotate-half order to interleaved
pairs; :func:`unpermute_qk` undoes it so :mod:`fedgen.models.llama` (rotate-half RoPE) is exact.
The per-block tensors ``blk.{i}.*`` become the layer-stacked tree ``layers/*`` [L, ...]: each
tensor is cast to the model dtype as it is dequantized and written into its preallocated stack,
so loading holds the model once in that dtype (plus one tensor), not per-layer copies beside it.
"""
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedgen.io import tokenizer as tokenizers_
from fedgen.models import backbone, llama

GGUF_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K', 'Q4_K',
              'Q5_K', 'Q6_K')
# GGUF per-block tensor name -> our module path inside layers_{i}.
GGUF_BLOCK = {
    'attn_norm': ('input_layernorm', 'weight'),
    'ffn_norm': ('post_attention_layernorm', 'weight'),
    'attn_q': ('self_attn', 'q_proj', 'kernel'),
    'attn_k': ('self_attn', 'k_proj', 'kernel'),
    'attn_v': ('self_attn', 'v_proj', 'kernel'),
    'attn_output': ('self_attn', 'o_proj', 'kernel'),
    'ffn_gate': ('mlp', 'gate_proj', 'kernel'),
    'ffn_up': ('mlp', 'up_proj', 'kernel'),
    'ffn_down': ('mlp', 'down_proj', 'kernel'),
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation. w [n_head * d_h, in]: within each head, GGUF row
    2i + j holds HF row j * d_h / 2 + i (interleaved pairs -> rotate-half halves)."""
    out, d_in = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


class Stacks:
    """The layer-stacked block tensors, filled one layer's tensor at a time.

    put(path, i, w, dtype) writes w into layers/<path> [L, ...] at row i (allocated, in ``dtype``,
    at the first layer seen); done() -> {('layers', *path): [L, ...]} after checking that every
    path has all L layers. Layer indices outside 0..L-1, a repeated layer or a shape that differs
    from the first layer's raise a one-line ValueError naming ``field`` (as
    :func:`fedgen.models.layers.stack_blocks` does for loaders that stack afterwards).
    """

    def __init__(self, n_layer: int, field: str):
        self.n_layer, self.field = n_layer, field
        self.arrays, self.seen = {}, {}

    def put(self, path: tuple, i: int, w: np.ndarray, dtype) -> None:
        name = '/'.join(path)
        if not 0 <= i < self.n_layer:
            raise ValueError(f'{self.field}: layers_{i}/{name} is outside the {self.n_layer} '
                             'layers of block_count')
        if path not in self.arrays:
            self.arrays[path] = np.empty((self.n_layer, ) + w.shape, dtype)
            self.seen[path] = set()
        a = self.arrays[path]
        if a.shape[1:] != w.shape:
            raise ValueError(f'{self.field}: layers_{i}/{name} is {w.shape} but another layer has '
                             f'{a.shape[1:]} (stacked layers need the same leaves and shapes)')
        if i in self.seen[path]:
            raise ValueError(f'{self.field}: layers_{i}/{name} appears twice')
        a[i] = w
        self.seen[path].add(i)

    def done(self) -> dict:
        for path, seen in self.seen.items():
            if len(seen) != self.n_layer:
                missing = min(set(range(self.n_layer)) - seen)
                raise ValueError(
                    f'{self.field}: layers_{missing}/{"/".join(path)} is missing '
                    f'(stacked layers must be 0..{self.n_layer - 1}, every one present)')
        return {('layers', ) + path: a for path, a in self.arrays.items()}


def _meta(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x) -> float:
    """A float32 metadata value as its shortest decimal (1e-5 rather than 9.99999974e-06)."""
    return float(str(np.float32(x)))


def load_gguf(path: str,
              lora_alpha: float = 16.0,
              dtype: str = 'float32',
              remat: bool = False,
              field: str = 'source') -> backbone.Backbone:
    """A llama-architecture GGUF: hyper-parameters, dequantized weights and embedded tokenizer."""
    import gguf
    if dtype not in llama.DTYPES:
        raise ValueError(f'model.dtype must be one of {llama.DTYPES}, got {dtype!r}')
    if not os.path.isfile(path):
        raise ValueError(f'{field}: GGUF file {path} does not exist')
    reader = gguf.GGUFReader(path)
    arch = _meta(reader, 'general.architecture')
    if arch != 'llama':
        raise ValueError(f"{field}: GGUF architecture {arch!r} is not supported ('llama')")
    bad = [(t.name, t.tensor_type.name) for t in reader.tensors
           if t.tensor_type.name not in GGUF_TYPES]
    if bad:
        raise ValueError(f'{field}: GGUF quantization type {bad[0][1]} (tensor {bad[0][0]}) is '
                         f'not supported (supported: {", ".join(GGUF_TYPES)})')
    scaling = _meta(reader, 'llama.rope.scaling.type', 'none')
    if scaling != 'none':
        raise ValueError(f'{field}: GGUF rope scaling type {scaling!r} is not supported')
    m = lambda k, d=None: _meta(reader, f'llama.{k}', d)
    heads = int(m('attention.head_count'))
    kv = int(m('attention.head_count_kv', heads))
    d = int(m('embedding_length'))
    head_dim = int(m('attention.key_length', d // heads))
    if int(m('rope.dimension_count', head_dim)) != head_dim:
        raise ValueError(f'{field}: GGUF partial RoPE (rope.dimension_count '
                         f'{m("rope.dimension_count")} < head_dim {head_dim}) is not supported')
    n_layer, np_dtype = int(m('block_count')), np.dtype(jnp.dtype(dtype))
    flat, stacks = {}, Stacks(n_layer, field)
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        parts = t.name.split('.')
        if t.name == 'token_embd.weight':
            flat[('embed_tokens', 'embedding')] = w.astype(np_dtype, copy=False)
        elif t.name == 'output_norm.weight':
            flat[('norm', 'weight')] = w.astype(np_dtype, copy=False)
        elif t.name == 'output.weight':
            flat[('lm_head', 'kernel')] = np.ascontiguousarray(w.T, np_dtype)
        elif parts[0] == 'blk' and parts[2] in GGUF_BLOCK and parts[3] == 'weight':
            if parts[2] in ('attn_q', 'attn_k'):
                w = unpermute_qk(w, heads if parts[2] == 'attn_q' else kv)
            stacks.put(GGUF_BLOCK[parts[2]], int(parts[1]), w.T if w.ndim == 2 else w, np_dtype)
        else:
            raise ValueError(f'{field}: GGUF tensor {t.name!r} is not supported by the Llama model')
        del w
    flat.update(stacks.done())
    vocab = flat[('embed_tokens', 'embedding')].shape[0]
    cfg = llama.LlamaConfig(vocab_size=vocab,
                            n_positions=int(m('context_length', 2048)),
                            n_embd=d,
                            n_layer=int(m('block_count')),
                            n_head=heads,
                            n_kv_head=kv,
                            n_inner=int(m('feed_forward_length')),
                            head_dim=head_dim if head_dim != d // heads else 0,
                            rope_theta=_f32(m('rope.freq_base', 1e4)),
                            rms_norm_eps=_f32(m('attention.layer_norm_rms_epsilon', 1e-5)),
                            tie_word_embeddings=('lm_head', 'kernel') not in flat,
                            lora_alpha=lora_alpha,
                            dtype=dtype,
                            remat=remat)
    params = traverse_util.unflatten_dict(flat)
    return backbone.finish('llama', cfg, params, _gguf_tokenizer(reader, field), dtype, field)


def _gguf_tokenizer(reader, field: str) -> tokenizers_.Tokenizer | None:
    if _meta(reader, 'tokenizer.ggml.tokens') is None:
        return None
    g = lambda k, dflt=None: _meta(reader, f'tokenizer.ggml.{k}', dflt)
    return tokenizers_.from_gguf_fields(g('tokens'), g('merges', []), g('token_type', []),
                                        g('pre', 'default'), g('model'), g('bos_token_id'),
                                        g('eos_token_id'), field)


def load_gguf_tokenizer(path: str, field: str = 'source') -> tokenizers_.Tokenizer:
    """Only the tokenizer a GGUF file embeds (no weights are read)."""
    import gguf
    if not os.path.isfile(path):
        raise ValueError(f'{field}: GGUF file {path} does not exist')
    tok = _gguf_tokenizer(gguf.GGUFReader(path), field)
    if tok is None:
        raise ValueError(f'{field}: GGUF file {path} embeds no tokenizer')
    return tok
