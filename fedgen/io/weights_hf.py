"""Hugging Face checkpoint directories: config.json + safetensors, read and written.

GPT-2 or Llama, in the PyTorch layout (Linear weight [out, in], GPT-2 Conv1D weight [in, out]) or
the Flax layout (kernel) that save_pretrained writes. The per-layer tensors ``model.layers.{i}.*``
(``transformer.h.{i}.*``) become the model's layer-stacked tree ``layers/*`` [L, ...] (``h/*``),
and :func:`to_hf_tensors` splits it back, so the files keep Hugging Face's names.
"""
import json
import os

import numpy as np
from flax import traverse_util

from fedgen.io import tokenizer as tokenizers_
from fedgen.models import backbone, gpt, layers, llama


def read_safetensors(path: str, field: str = 'source') -> dict:
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
                         field='source') -> llama.LlamaConfig:
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


def gpt2_config_from_hf(hf: dict, lora_alpha=16.0, field='source') -> gpt.GPTConfig:
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


def llama_from_hf_tensors(tensors: dict[str, np.ndarray], tie: bool, field='source') -> dict:
    """HF Llama tensors (PyTorch '...weight' [out, in] or Flax '...kernel' [in, out]) -> params,
    the blocks ``model.layers.{i}.*`` stacked into ``layers/*`` [L, ...]."""
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
    return layers.stack_blocks(traverse_util.unflatten_dict(flat), 'layers_', 'layers')


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
                field: str = 'source') -> backbone.Backbone:
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
    return backbone.finish('llama' if mtype == 'llama' else 'gpt2', cfg, params, tok, dtype, field)


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
    """Our (layer-stacked) params -> Hugging Face PyTorch-layout tensors (float32), one per layer
    (``model.layers.{i}.*``), the inverse of the loaders."""
    out = {}
    if arch == 'llama':
        params = layers.unstack_blocks(params, 'layers', 'layers_')
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
