"""Pure-function LoRA over plain param dicts.

A frozen kernel W0 gets an adapter (A, B) whose shapes follow the kernel's:

    dense  W0 [in, out]             A [in, r]             B [r, out]
    stack  W0 [L, in, out]          A [L, in, r]          B [L, r, out]    (L layer-stacked blocks)
    conv   W0 [kh, kw, in, out]     A [kh, kw, in, r]     B [r, out]

and the adapted kernel is W = W0 + (alpha / r) A B, contracted over r (per layer l for a stacked
kernel: W_l = W0_l + (alpha / r) A_l B_l). A 3-d kernel is a layer-stack of dense kernels (the
models scan their blocks, :func:`fedgen.models.layers.scan_blocks`), so ``B.ndim == 3`` marks a
stacked module: L independent adapters that share a path.

A is drawn from N(0, 1/fan_in) (fan_in = in for dense and stacked, kh kw in for conv) and B = 0, so
a fresh adapter leaves the backbone unchanged. Which kernels get adapters is decided by regex
*path rules* matched against the '/'-joined param path of every leaf named ``kernel`` (for example
``h/attn/q/kernel``). The adapter tree mirrors the module paths of its targets:
``{'h': {'attn': {'q': {'a': A, 'b': B}}}}``, and it is passed to a model as the ``lora`` variable
collection (see :mod:`fedgen.models.layers`).
"""
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any

# Named rule presets; a config may also give raw regexes.
PRESETS = {
    'qv': (r'attn/(q|v)/kernel$', ),
    'attn': (r'attn/(q|k|v|o)/kernel$', ),
    'qv_mlp': (r'attn/(q|v)/kernel$', r'mlp/(fc|proj)/kernel$'),
    'attn_mlp': (r'attn/(q|k|v|o)/kernel$', r'mlp/(fc|proj)/kernel$'),
    # U-Net residual-block convolutions (rank-r over in/out channels, see models/layers.Conv).
    'conv': (r'res/conv\d/kernel$', ),
    # Llama-family decoders (models/llama.py, Hugging Face module names).
    'llama_qv': (r'self_attn/(q|v)_proj/kernel$', ),
    'llama_attn': (r'self_attn/(q|k|v|o)_proj/kernel$', ),
    'llama_attn_mlp': (r'self_attn/(q|k|v|o)_proj/kernel$', r'mlp/(gate|up|down)_proj/kernel$'),
}
DEFAULT_RULES = PRESETS['qv']


def resolve_rules(rules: str | Sequence[str], *, section: str = '') -> tuple[str, ...]:
    """Expands a preset name (or a comma-separated list of presets/regexes) into regexes; errors
    call the rules ``targets``.

    section: the caller's prefix for the names in error messages, e.g. 'lora.'.
    """
    if isinstance(rules, str):
        rules = [r.strip() for r in rules.split(',') if r.strip()]
    out: list[str] = []
    for r in rules:
        out.extend(PRESETS.get(r, (r, )))
    if not out:
        raise ValueError(f'{section}targets must name at least one rule or preset '
                         f'(presets: {sorted(PRESETS)})')
    return tuple(out)


def target_paths(params: PyTree,
                 rules: str | Sequence[str],
                 *,
                 section: str = '') -> list[tuple[str, ...]]:
    """Paths (tuples of keys, ending in 'kernel') of the kernels selected by ``rules``.

    Raises ValueError naming the rule (one of the ``targets``) when a rule matches no kernel.
    section: the caller's prefix for the names in error messages, e.g. 'lora.'.
    """
    flat = traverse_util.flatten_dict(params)
    kernels = [p for p in flat if p[-1] == 'kernel']
    chosen: list[tuple[str, ...]] = []
    for rule in resolve_rules(rules, section=section):
        pat = re.compile(rule)
        hits = [p for p in kernels if pat.search('/'.join(p))]
        if not hits:
            modules = sorted({p[-2] for p in kernels if len(p) >= 2})
            raise ValueError(f'{section}targets rule {rule!r} matches no kernel; the model\'s '
                             f'modules with a kernel are {", ".join(modules) or "<none>"} '
                             f'(paths look like {"/".join(kernels[0]) if kernels else "<none>"})')
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


def init(rng: jax.Array,
         params: PyTree,
         rules: str | Sequence[str],
         rank: int,
         *,
         section: str = '') -> PyTree:
    """Creates adapters {path: {'a': A, 'b': B = 0}} for the target kernels (shapes: module doc).

    Adapters are float32 whatever the frozen kernel's dtype (a bf16 backbone trains f32 adapters
    and keeps f32 optimizer state; the layers cast them to the compute dtype).

    Raises ValueError when ``rank`` is not in [1, min(in, out)] for some target, or a rule of
    ``rules`` (the ``targets``) matches no kernel.
    section: the caller's prefix for the names in error messages, e.g. 'lora.'.
    """
    flat = traverse_util.flatten_dict(params)
    paths = target_paths(params, rules, section=section)
    out = {}
    for i, path in enumerate(paths):
        w = flat[path]
        stacked = w.ndim == 3  # [L, in, out]
        fan_in = w.shape[-2] if stacked else int(np.prod(w.shape[:-1]))
        fan_out = w.shape[-1]
        limit = min(w.shape[-2], fan_out)
        if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
            raise ValueError(f'{section}rank must be an int in [1, {limit}] for kernel '
                             f'{"/".join(path)} {tuple(w.shape)}, got {rank!r}')
        key = jax.random.fold_in(rng, i)
        a = jax.random.normal(key, w.shape[:-1] + (rank, ), jnp.float32) / math.sqrt(fan_in)
        out[path[:-1] + ('a', )] = a
        layer_axis = w.shape[:1] if stacked else ()
        out[path[:-1] + ('b', )] = jnp.zeros(layer_axis + (rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def scale(alpha: float, a: jax.Array) -> float:
    """The LoRA scaling alpha / r, with r the adapter rank (the last axis of A)."""
    return alpha / a.shape[-1]


def delta(a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """(alpha / r) A B with the kernel's shape: [in, out], [L, in, out] (per layer) or
    [kh, kw, in, out]."""
    if b.ndim == 3:  # layer-stacked: one product per layer
        return scale(alpha, a) * jnp.matmul(a, b)
    return scale(alpha, a) * jnp.tensordot(a, b, axes=1)


def merge(params: PyTree, adapters: PyTree, alpha: float) -> PyTree:
    """Returns params with every adapted kernel replaced by W0 + (alpha/r) A B (for export)."""
    flat = dict(traverse_util.flatten_dict(params))
    ad = traverse_util.flatten_dict(adapters)
    for path in {p[:-1] for p in ad}:
        kpath = path + ('kernel', )
        if kpath not in flat:
            raise ValueError(f'adapter at {"/".join(path)} has no kernel in params')
        flat[kpath] = flat[kpath] + delta(ad[path + ('a', )], ad[path + ('b', )], alpha)
    return traverse_util.unflatten_dict(flat)
