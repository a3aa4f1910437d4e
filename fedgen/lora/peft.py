"""LoRA adapters in Hugging Face PEFT format: export, import, and merged full weights.

PEFT stores, per adapted module M (its Hugging Face name), ``base_model.model.<M>.lora_A.weight``
[r, in] and ``...lora_B.weight`` [out, r], and applies W x + (alpha_M / r_M) B A x. fedgen's adapter
at the same module is a [in, r], b [r, out] with scale alpha / r (``model.lora_alpha``), so
A = a^T, B = b^T and the update is the same matrix.

GPT-2 fuses q, k and v into one ``c_attn`` (a Conv1D [in, 3D]) that PEFT adapts with a single A.
fedgen adapts q, k, v separately; m of them with rank r export exactly as one rank-m r ``c_attn``
adapter with A = [a_q; a_v]^T and block-structured B (member j's b^T in its D output rows and its r
columns, zeros elsewhere) and alpha_M = m alpha, so alpha_M / (m r) = alpha / r. Modules whose rank
or alpha differs from the config's ``r`` / ``lora_alpha`` are listed in ``rank_pattern`` /
``alpha_pattern``. Import inverts this (a c_attn adapter of rank R becomes q, k, v adapters of rank
R) and folds the file's scale into b so the model's own ``lora_alpha`` reproduces it exactly.

fedgen's block adapters are layer-stacked (a [L, in, r], b [L, r, out] under ``layers/`` or ``h/``,
see :mod:`fedgen.lora.adapters`); the files keep one module per layer
(``model.layers.{i}.self_attn.q_proj``,
``transformer.h.{i}.attn.c_attn``), so real PEFT loads them. Export splits the stack, import stacks
the layers again and needs every layer 0..L-1 of a module at one rank.
"""
import collections
import json
import math
import os
import re

import jax
import numpy as np
from flax import traverse_util

from fedgen.lora import adapters as lora
from fedgen.models import layers
from fedgen.io import weights_hf

PREFIX = 'base_model.model.'
GPT2_NAMES = {
    ('attn', 'o'): 'attn.c_proj',
    ('mlp', 'fc'): 'mlp.c_fc',
    ('mlp', 'proj'): 'mlp.c_proj'
}
QKV = ('q', 'k', 'v')
# arch -> (the stacked blocks' module name, the per-layer prefix of the unstacked tree).
BLOCKS = {'llama': ('layers', 'layers_'), 'gpt2': ('h', 'h_')}


def _per_layer(arch: str, tree: dict) -> dict:
    """A layer-stacked tree -> {layers_0: ..., layers_1: ...} (``h_{i}`` for GPT-2)."""
    return layers.unstack_blocks(tree, *BLOCKS[arch])


def hf_module(arch: str, path: tuple) -> str:
    """Our module path (no leaf) -> the Hugging Face module name."""
    block, rest = path[0], path[1:]
    if arch == 'llama':
        return f'model.layers.{block[7:]}.' + '.'.join(rest)
    if rest[0] == 'attn' and rest[1] in QKV:
        return f'transformer.h.{block[2:]}.attn.c_attn'
    return f'transformer.h.{block[2:]}.{GPT2_NAMES[rest]}'


def _modules(arch: str, adapters: dict, alpha: float) -> dict:
    """{HF module name: (A [R, in], B [out, R], alpha_M)} for each adapted module of each layer."""
    adapters = _per_layer(arch, jax.tree.map(lambda x: np.asarray(x, np.float32), adapters))
    flat = traverse_util.flatten_dict(adapters)
    out, fused = {}, collections.defaultdict(dict)
    for path in sorted({p[:-1] for p in flat}):
        a, b = flat[path + ('a', )], flat[path + ('b', )]
        if arch == 'gpt2' and path[1] == 'attn' and path[2] in QKV:
            fused[hf_module(arch, path)][path[2]] = (a, b)
        else:
            out[hf_module(arch, path)] = (a.T, b.T, alpha)
    for name, members in fused.items():
        present = [m for m in QKV if m in members]
        ranks = {members[m][0].shape[1] for m in present}
        if len(ranks) != 1:
            raise ValueError(f'{name}: q/k/v adapters of ranks {sorted(ranks)} cannot share one '
                             'c_attn adapter (give them equal ranks)')
        r, d = ranks.pop(), members[present[0]][1].shape[1]
        big_a = np.concatenate([members[m][0].T for m in present], 0)  # [m r, in]
        big_b = np.zeros((3 * d, len(present) * r), np.float32)
        for j, m in enumerate(present):
            s = QKV.index(m)
            big_b[s * d:(s + 1) * d, j * r:(j + 1) * r] = members[m][1].T
        out[name] = (big_a, big_b, len(present) * alpha)
    return out


def _target_modules(arch: str, params: dict, names: set[str]) -> list[str]:
    """Short names (e.g. 'q_proj', 'attn.c_proj') where every such module is adapted, else the
    full names; PEFT matches a target t against a module key k when k == t or k ends with '.t'."""
    kernels = {
        hf_module(arch, p[:-1])
        for p in traverse_util.flatten_dict(_per_layer(arch, params))
        if p[-1] == 'kernel' and p[0].startswith(('layers_', 'h_'))
    }
    short = lambda n: '.'.join(n.split('.')[-2 if arch == 'gpt2' else -1:])
    out = set()
    for n in names:
        group = {k for k in kernels if short(k) == short(n)}
        out.add(short(n) if group <= names else n)
    return sorted(out)


def export_adapter(out_dir: str,
                   arch: str,
                   params: dict,
                   adapters: dict,
                   alpha: float,
                   base_model: str = '') -> dict:
    """Writes adapter_config.json + adapter_model.safetensors; returns the config dict.

    ``adapters`` is one LoRA tree (no client axis; block modules layer-stacked) of the backbone
    ``params`` (arch 'gpt2' | 'llama').
    """
    from safetensors.numpy import save_file
    mods = _modules(arch, adapters, alpha)
    if not mods:
        raise ValueError('export: the adapter tree is empty')
    counts = collections.Counter((m[0].shape[0], m[2]) for m in mods.values())
    (r, lora_alpha), _ = counts.most_common(1)[0]
    cfg = {
        'peft_type': 'LORA',
        'task_type': 'CAUSAL_LM',
        'base_model_name_or_path': base_model,
        'r': int(r),
        'lora_alpha': float(lora_alpha),
        'target_modules': _target_modules(arch, params, set(mods)),
        'rank_pattern': {
            re.escape(n): int(m[0].shape[0])
            for n, m in mods.items() if m[0].shape[0] != r
        },
        'alpha_pattern': {
            re.escape(n): float(m[2])
            for n, m in mods.items() if m[2] != lora_alpha
        },
        'lora_dropout': 0.0,
        'bias': 'none',
        'fan_in_fan_out': arch == 'gpt2',  # GPT-2's Conv1D stores weights [in, out]
        'use_rslora': False,
        'use_dora': False,
        'init_lora_weights': True,
        'inference_mode': True,
        'modules_to_save': None,
    }
    tensors = {}
    for n, (a, b, _) in mods.items():
        tensors[f'{PREFIX}{n}.lora_A.weight'] = np.ascontiguousarray(a)
        tensors[f'{PREFIX}{n}.lora_B.weight'] = np.ascontiguousarray(b)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'adapter_config.json'), 'w') as f:
        json.dump(cfg, f, indent=1)
    save_file(tensors, os.path.join(out_dir, 'adapter_model.safetensors'), {'format': 'pt'})
    return cfg


def export_merged(out_dir: str, arch: str, cfg, params: dict, adapters: dict, alpha: float) -> None:
    """Writes the merged backbone W0 + (alpha / r) a b as a Hugging Face directory (float32)."""
    full = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    ad = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    merged = jax.tree.map(np.asarray, lora.merge(full, ad, alpha))
    weights_hf.save_hf_dir(out_dir, arch, cfg, merged)


def _pattern(patterns: dict, name: str, default):
    for key, v in (patterns or {}).items():
        if re.match(rf'(.*\.)?({key})$', name):
            return v
    return default


def _our_path(arch: str, name: str, field: str) -> tuple:
    if arch == 'llama':
        m = re.fullmatch(r'(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)', name)
        if m:
            return (f'layers_{m[1]}', m[2], m[3])
    else:
        m = re.fullmatch(
            r'(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|'
            r'mlp\.c_proj)', name)
        if m:
            inv = {v: k for k, v in GPT2_NAMES.items()}
            return (f'h_{m[1]}', ) + inv.get(m[2], ('attn', 'qkv'))
    raise ValueError(f'{field}: adapter module {name!r} has no {arch} counterpart in fedgen')


def import_adapter(path: str, arch: str, model_alpha: float, field: str = 'path') -> dict:
    """Reads a PEFT LoRA directory into a fedgen adapter tree for ``arch`` whose update, with the
    model's own lora_alpha ``model_alpha``, equals the file's: b = B^T (s_file / (alpha / R)).
    Returns the layer-stacked tree (a [L, in, R], b [L, R, out]). ``field``: the name errors give
    ``path`` (the caller's, e.g. 'lora.init_from')."""
    from safetensors.numpy import load_file
    cfg_file = os.path.join(path, 'adapter_config.json')
    st_file = os.path.join(path, 'adapter_model.safetensors')
    if not (os.path.isfile(cfg_file) and os.path.isfile(st_file)):
        raise ValueError(f'{field}: {path} must hold adapter_config.json and '
                         'adapter_model.safetensors (a PEFT LoRA adapter)')
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get('peft_type') != 'LORA':
        raise ValueError(f'{field}: peft_type {cfg.get("peft_type")!r} is not LORA')
    for key, ok in (('use_dora', False), ('bias', 'none'), ('modules_to_save', None)):
        if cfg.get(key, ok) not in (ok, [] if ok is None else ok):
            raise ValueError(f'{field}: PEFT {key}={cfg[key]!r} is not supported')
    tensors = load_file(st_file)
    names = sorted({k[len(PREFIX):].rsplit('.lora_', 1)[0] for k in tensors})
    flat = {}
    for name in names:
        a = tensors[f'{PREFIX}{name}.lora_A.weight'].astype(np.float32)  # [R, in]
        b = tensors[f'{PREFIX}{name}.lora_B.weight'].astype(np.float32)  # [out, R]
        rank = a.shape[0]
        file_alpha = _pattern(cfg.get('alpha_pattern'), name, cfg['lora_alpha'])
        scale = file_alpha / (math.sqrt(rank) if cfg.get('use_rslora') else rank)
        b = b * (scale / (model_alpha / rank))
        path = _our_path(arch, name, field)
        if path[-1] == 'qkv':  # GPT-2 fused c_attn -> q, k, v sharing A
            for i, blk in enumerate(np.split(b, 3, axis=0)):
                flat[path[:-1] + (QKV[i], 'a')] = a.T
                flat[path[:-1] + (QKV[i], 'b')] = blk.T
        else:
            flat[path + ('a', )], flat[path + ('b', )] = a.T, b.T
    return layers.stack_blocks(traverse_util.unflatten_dict(flat), BLOCKS[arch][1], BLOCKS[arch][0],
                               field)


def initial_adapters(path: str,
                     arch: str,
                     model_alpha: float,
                     template: dict,
                     *,
                     section: str = '') -> dict:
    """The PEFT adapter at ``path`` as the run's starting adapter tree.

    ``template`` is the fresh adapter tree of the run's targets and rank; the file must
    adapt exactly those modules with the same shapes (a [L, in, r], b [L, r, out]), else a one-line
    ValueError names the first difference (a file that adapts fewer layers than the model shows
    as a shape [L', ...] against [L, ...]). Returns float32 arrays shaped like ``template``.
    section: the caller's prefix for init_from, targets and rank in error messages, e.g. 'lora.'.
    """
    field = f'{section}init_from'
    got = traverse_util.flatten_dict(import_adapter(path, arch, model_alpha, field))
    want = traverse_util.flatten_dict(template)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        first = '/'.join((missing or extra)[0])
        raise ValueError(f'{field}: {path} adapts other modules than {section}targets '
                         f'({len(missing)} missing, {len(extra)} extra; e.g. {first})')
    for k, v in want.items():
        if got[k].shape != v.shape:
            rank = v.shape[-1] if k[-1] == 'a' else v.shape[-2]
            raise ValueError(f'{field}: {path} has {"/".join(k)} of shape {got[k].shape}, '
                             f'the run needs {tuple(v.shape)} ({section}rank={rank})')
    return traverse_util.unflatten_dict({k: np.asarray(got[k], np.float32) for k in want})
