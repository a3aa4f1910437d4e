"""GPT-2-architecture decoder in flax linen, with a param layout that maps one-to-one onto GPT-2.

Param tree (L = n_layer, D = n_embd, V = vocab_size, P = n_positions, kernels are [in, out]). The
L blocks are stacked on a leading layer axis and run as one scan
(:func:`fedgen.models.layers.scan_blocks`); ``h/...`` [L, ...] holds GPT-2's ``h.{i}...``:

    wte/embedding [V, D]      wpe/embedding [P, D]      ln_f/{scale, bias} [D]
    h/ln_1, h/ln_2            {scale, bias} [L, D]
    h/attn/{q,k,v,o}          {kernel [L, D, D], bias [L, D]}
    h/mlp/fc                  {kernel [L, D, 4D], bias [L, 4D]}
    h/mlp/proj                {kernel [L, 4D, D], bias [L, D]}

GPT-2's fused ``c_attn`` [D, 3D] is split column-wise into q, k, v so that LoRA path rules can name
the projections (:func:`from_hf` / :func:`to_hf` are exact inverses). The block is pre-LN:

    x = x + Attn(LN1(x));  x = x + MLP(LN2(x));  logits = LN_f(x) wte^T   (tied output layer)

with causal softmax attention scaled by 1/sqrt(D / n_head) and GELU (tanh approximation).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fedgen.models import layers


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture hyper-parameters (all fields are validated by :func:`validate`)."""
    vocab_size: int = 10000
    n_positions: int = 64
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5
    lora_alpha: float = 16.0


def validate(cfg: GPTConfig, *, section: str = '') -> None:
    """Raises a one-line ValueError naming the first bad field: sizes are ints >= 1 and n_head
    divides n_embd. section: the caller's prefix for the field names, e.g. 'model.'."""
    for name in ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head'):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f'{section}{name} must be an int >= 1, got {v!r}')
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f'{section}n_head must divide {section}n_embd={cfg.n_embd}, got '
                         f'{cfg.n_head}')


class Attention(nn.Module):
    """Causal multi-head self-attention. x [B, T, D] -> [B, T, D]."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.cfg.n_head
        dense = lambda name: layers.Dense(d, lora_alpha=self.cfg.lora_alpha, name=name)
        split = lambda y: y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
        q, k, v = (split(dense(n)(x)) for n in ('q', 'k', 'v'))
        scores = jnp.einsum('bhqd,bhkd->bhqk', q, k) / jnp.sqrt(d // h).astype(x.dtype)
        scores = jnp.where(layers.causal_mask(t), scores, jnp.finfo(scores.dtype).min)
        y = jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(scores, axis=-1), v)
        return dense('o')(y.transpose(0, 2, 1, 3).reshape(b, t, d))


class MLP(nn.Module):
    """x [B, T, D] -> proj(gelu(fc(x))) with hidden width 4D."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        y = layers.Dense(4 * d, lora_alpha=self.cfg.lora_alpha, name='fc')(x)
        y = jax.nn.gelu(y, approximate=True)
        return layers.Dense(d, lora_alpha=self.cfg.lora_alpha, name='proj')(y)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        """x [B, T, D] -> (x', None): the scan's carry and (empty) per-layer output."""
        eps = self.cfg.layer_norm_epsilon
        x = x + Attention(self.cfg, name='attn')(layers.layer_norm('ln_1', eps)(x))
        return x + MLP(self.cfg, name='mlp')(layers.layer_norm('ln_2', eps)(x)), None


class GPT(nn.Module):
    """Decoder-only LM. tokens [B, T] int32 (T <= n_positions) -> logits [B, T, V]."""
    cfg: GPTConfig

    def setup(self):
        self.wte = nn.Embed(self.cfg.vocab_size,
                            self.cfg.n_embd,
                            embedding_init=nn.initializers.normal(0.02),
                            name='wte')
        self.wpe = nn.Embed(self.cfg.n_positions,
                            self.cfg.n_embd,
                            embedding_init=nn.initializers.normal(0.01),
                            name='wpe')
        self.h = layers.scan_blocks(Block, self.cfg.n_layer, False, ())(self.cfg, name='h')
        self.ln_f = layers.layer_norm('ln_f', self.cfg.layer_norm_epsilon)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final-layer-normed hidden states [B, T, D]."""
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))[None]
        return self.ln_f(self.h(x)[0])

    def unembed(self, h: jax.Array) -> jax.Array:
        """Tied output layer: h [..., D] -> logits [..., V] = h wte^T."""
        return self.wte.attend(h)

    def unembed_slice(self, h: jax.Array, start: jax.Array, size: int) -> jax.Array:
        """Logits of vocabulary entries [start, start + size): h [..., D] -> [..., size], the
        same values as unembed(h)[..., start:start + size]."""
        w = jax.lax.dynamic_slice_in_dim(self.wte.embedding, start, size, 0)
        return jnp.dot(h, w.T.astype(jnp.result_type(h, w)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.unembed(self.hidden(tokens))


class _Unrolled(nn.Module):
    """The same parameters with one submodule per block (h_0, h_1, ...): init only. Flax derives
    each module's init key from its path, so initializing this tree and stacking it gives the
    same numbers for any depth as a model whose blocks are separate modules, and keeps every
    seed's backbone what it was before the blocks became one scan."""
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        wte = nn.Embed(cfg.vocab_size,
                       cfg.n_embd,
                       embedding_init=nn.initializers.normal(0.02),
                       name='wte')
        wpe = nn.Embed(cfg.n_positions,
                       cfg.n_embd,
                       embedding_init=nn.initializers.normal(0.01),
                       name='wpe')
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))[None]
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f'h_{i}')(x)[0]
        return wte.attend(layers.layer_norm('ln_f', cfg.layer_norm_epsilon)(x))


def init_params(cfg: GPTConfig, rng: jax.Array) -> dict:
    """Random GPT-2-style init of the ``params`` collection (blocks stacked under ``h``)."""
    validate(cfg)
    params = _Unrolled(cfg).init(rng, jnp.zeros((1, 2), jnp.int32))['params']
    return layers.stack_blocks(params, 'h_', 'h')


def to_hf(params: dict) -> dict:
    """Our params -> HF Flax GPT-2 layout: {'transformer': ...}, kernels [out, in], c_attn fused,
    one subtree ``h/{i}`` per layer."""
    flat = traverse_util.flatten_dict(layers.unstack_blocks(params, 'h', 'h_'))
    out = {}
    for path, v in flat.items():
        if path[0].startswith('h_'):
            i, rest = path[0][2:], path[1:]
            if rest[0] == 'attn' and rest[1] in ('q', 'k', 'v'):
                continue  # fused below
            name = {'o': 'c_proj', 'fc': 'c_fc', 'proj': 'c_proj'}.get(rest[1], rest[1])
            new = ('h', i) + ((rest[0], name) + rest[2:] if len(rest) > 2 else rest)
            out[new] = v.T if new[-1] == 'kernel' else v
        else:
            out[path] = v
    for blk in {p[0] for p in flat if p[0].startswith('h_')}:
        for leaf in ('kernel', 'bias'):
            parts = [flat[(blk, 'attn', n, leaf)] for n in ('q', 'k', 'v')]
            fused = jnp.concatenate(parts, axis=-1)
            out[('h', blk[2:], 'attn', 'c_attn', leaf)] = fused.T if leaf == 'kernel' else fused
    return {'transformer': traverse_util.unflatten_dict(out)}


def from_hf(hf_params: dict) -> dict:
    """Inverse of :func:`to_hf`: HF Flax GPT-2 params (kernels [out, in]) -> our layer-stacked
    layout."""
    flat = traverse_util.flatten_dict(hf_params.get('transformer', hf_params))
    out = {}
    rename = {'c_fc': 'fc'}
    for path, v in flat.items():
        if path[0] != 'h':
            out[path] = jnp.asarray(v)
            continue
        blk, rest = f'h_{path[1]}', path[2:]
        v = jnp.asarray(v.T if rest[-1] == 'kernel' else v)
        if rest[:2] == ('attn', 'c_attn'):
            for n, part in zip('qkv', jnp.split(v, 3, axis=-1)):
                out[(blk, 'attn', n, rest[-1])] = part
        elif rest[:2] == ('attn', 'c_proj'):
            out[(blk, 'attn', 'o', rest[-1])] = v
        elif rest[0] == 'mlp':
            out[(blk, 'mlp', rename.get(rest[1], 'proj'), rest[-1])] = v
        else:
            out[(blk, ) + rest] = v
    return layers.stack_blocks(traverse_util.unflatten_dict(out), 'h_', 'h')


def generate(model: GPT,
             variables: dict,
             prompt: jax.Array,
             steps: int,
             rng: jax.Array,
             temperature: float = 1.0) -> jax.Array:
    """Samples ``steps`` tokens after ``prompt`` [B, P]; returns [B, P + steps] (jittable).

    Without a KV cache: every step reruns the model on a fixed [B, P + steps] buffer (causal
    attention makes the padding invisible) and samples token t+1 from softmax(logits_t / temp).
    """
    b, p = prompt.shape
    total = p + steps
    if total > model.cfg.n_positions:
        raise ValueError(f'sample length {total} exceeds model.n_positions={model.cfg.n_positions}')
    buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)

    def step(buf, xs):
        t, key = xs
        logits = model.apply(variables, buf)[:, t - 1] / temperature
        return buf.at[:, t].set(jax.random.categorical(key, logits).astype(jnp.int32)), None

    ts = jnp.arange(p, total)
    buf, _ = jax.lax.scan(step, buf, (ts, jax.random.split(rng, steps)))
    return buf
