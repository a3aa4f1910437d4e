"""Llama-architecture decoder (SmolLM2, HF Llama checkpoints) in flax linen on plain param dicts.

Param tree (L = n_layer, D = n_embd, V = vocab_size, H / G = query / key-value heads, d_h =
head_dim, F = n_inner; kernels are [in, out]; modules are named as Hugging Face names them, so LoRA
rules, PEFT export and the loaders map one to one). The L blocks are stacked on a leading layer
axis and run as one scan (:func:`fedgen.models.layers.scan_blocks`), so compile time does not grow
with depth; ``layers/...`` [L, ...] holds what Hugging Face calls ``model.layers.{i}...``:

    embed_tokens/embedding [V, D]                 norm/weight [D]       lm_head/kernel [D, V]
    layers/input_layernorm/weight [L, D]          layers/post_attention_layernorm/weight [L, D]
    layers/self_attn/{q,k,v,o}_proj/kernel  [L, D, H d_h], [L, D, G d_h] (k, v), [L, H d_h, D]
    layers/mlp/{gate,up,down}_proj/kernel   [L, D, F], [L, D, F], [L, F, D]

(``lm_head`` only when ``tie_word_embeddings`` is False.) A LoRA adapter of a block kernel is
stacked the same way: A [L, in, r], B [L, r, out]. The block is pre-norm:

    x = x + o(Attn(RoPE(q(n1(x))), RoPE(k(n1(x))), v(n1(x))))
    x = x + down(silu(gate(n2(x))) * up(n2(x)))
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps);   logits = norm(x) E^T  (or norm(x) lm_head)

RoPE is Hugging Face's rotate-half form: for position p and i < d_h / 2, the pair (x_i, x_{i+d_h/2})
is rotated by the angle p * theta^(-2i / d_h). Grouped-query attention: query head h reads key/value
head h // (H / G). ``dtype`` is the compute dtype of the frozen weights (bf16 halves their memory);
norms, softmax, RoPE and logits stay float32, and LoRA adapters keep their own (f32) dtype.
``remat`` wraps each block in ``jax.checkpoint`` (activations recomputed in the backward pass).

Decoding uses a functional KV cache {'k', 'v'}: [L, B, S, G, d_h]: ``decode`` writes the
keys/values of positions [pos, pos + T) and attends to every cached position <= its own.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedgen.models import layers

DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (validated by :func:`validate`). head_dim 0 means D / H."""
    vocab_size: int = 49152
    n_positions: int = 2048
    n_embd: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_inner: int = 1536
    head_dim: int = 0
    rope_theta: float = 1e5
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    lora_alpha: float = 16.0
    dtype: str = 'float32'
    remat: bool = False

    @property
    def d_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


def validate(cfg: LlamaConfig, *, section: str = '') -> None:
    """Raises a one-line ValueError naming the first bad field: sizes are ints >= 1, n_kv_head
    divides n_head, n_head divides n_embd (without head_dim), the head dimension is even,
    rope_theta and rms_norm_eps are > 0 and dtype is one of DTYPES. section: the caller's prefix
    for the field names, e.g. 'model.'."""
    s = section
    for name in ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head', 'n_kv_head',
                 'n_inner'):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f'{s}{name} must be an int >= 1, got {v!r}')
    if cfg.n_head % cfg.n_kv_head:
        raise ValueError(f'{s}n_kv_head must divide {s}n_head={cfg.n_head}, '
                         f'got {cfg.n_kv_head}')
    if not cfg.head_dim and cfg.n_embd % cfg.n_head:
        raise ValueError(f'{s}n_head must divide {s}n_embd={cfg.n_embd} (or set '
                         f'{s}head_dim), got {cfg.n_head}')
    if cfg.d_head % 2:
        raise ValueError(f'{s}head_dim must be even for RoPE, got {cfg.d_head}')
    if not cfg.rope_theta > 0 or not cfg.rms_norm_eps > 0:
        raise ValueError(f'{s}rope_theta and {s}rms_norm_eps must be > 0, got '
                         f'{cfg.rope_theta}, {cfg.rms_norm_eps}')
    if cfg.dtype not in DTYPES:
        raise ValueError(f'{s}dtype must be one of {DTYPES}, got {cfg.dtype!r}')


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in float32, returned in ``dtype``."""
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param('weight', nn.initializers.ones, (x.shape[-1], ))
        x = x.astype(jnp.float32)
        y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (w.astype(jnp.float32) * y).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x [B, T, heads, d_h], positions [T] int -> same shape and dtype as x."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta**(jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None]  # [T, d/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[None, :, None]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[None, :, None]
    xf = x.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., d // 2:], xf[..., :d // 2]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE; optional KV cache (see module docstring)."""
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache=None, pos=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, _ = x.shape
        h, g, dh = cfg.n_head, cfg.n_kv_head, cfg.d_head

        def dense(features, name):
            return lambda y: layers.Dense(
                features, use_bias=False, lora_alpha=cfg.lora_alpha, name=name)(y).astype(dt)

        q = rope(dense(h * dh, 'q_proj')(x).reshape(b, t, h, dh), positions, cfg.rope_theta)
        k = rope(dense(g * dh, 'k_proj')(x).reshape(b, t, g, dh), positions, cfg.rope_theta)
        v = dense(g * dh, 'v_proj')(x).reshape(b, t, g, dh)
        if cache is None:
            key_pos = positions
        else:  # write this step's keys/values at [pos, pos + t) and attend over the whole cache
            k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, pos, 0, 0))
            v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, pos, 0, 0))
            cache = {'k': k, 'v': v}
            key_pos = jnp.arange(k.shape[1])
        q = q.reshape(b, t, g, h // g, dh)  # query head h -> (kv head h // (H/G), member)
        scores = jnp.einsum('btgmd,bsgd->bgmts', q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(dh))
        allowed = key_pos[None, :] <= positions[:, None]  # [T, S]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        y = jnp.einsum('bgmts,bsgd->btgmd', probs, v.astype(dt)).reshape(b, t, h * dh)
        return dense(cfg.n_embd, 'o_proj')(y), cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), hidden width n_inner."""
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = lambda f, name: layers.Dense(
            f, use_bias=False, lora_alpha=cfg.lora_alpha, name=name)
        y = jax.nn.silu(dense(cfg.n_inner, 'gate_proj')(x).astype(dt))
        y = y * dense(cfg.n_inner, 'up_proj')(x).astype(dt)
        return dense(cfg.n_embd, 'down_proj')(y).astype(dt)


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache=None, pos=None):
        dt = jnp.dtype(self.cfg.dtype)
        eps = self.cfg.rms_norm_eps
        a, cache = Attention(self.cfg, name='self_attn')(RMSNorm(eps, dt,
                                                                 name='input_layernorm')(x),
                                                         positions, cache, pos)
        x = x + a
        x = x + MLP(self.cfg, name='mlp')(RMSNorm(eps, dt, name='post_attention_layernorm')(x))
        return x, cache


class Llama(nn.Module):
    """Decoder-only LM. tokens [B, T] int32 -> logits [B, T, V] float32."""
    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size,
                                     cfg.n_embd,
                                     embedding_init=nn.initializers.normal(0.02),
                                     name='embed_tokens')
        blocks = layers.scan_blocks(Block, cfg.n_layer, cfg.remat, (nn.broadcast, 0, nn.broadcast))
        self.layers = blocks(cfg, name='layers')
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), name='norm')
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                'lm_head',
                lambda r: {'kernel': nn.initializers.normal(0.02)(r, (cfg.n_embd, cfg.vocab_size))})

    def _run(self, tokens, positions, cache=None, pos=None):
        x = self.embed_tokens(tokens).astype(jnp.dtype(self.cfg.dtype))
        x, cache = self.layers(x, positions, cache, pos)
        return self.norm(x), cache

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] (compute dtype)."""
        return self._run(tokens, jnp.arange(tokens.shape[-1]))[0]

    def unembed(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> float32 logits [..., V] (tied: h E^T; untied: h lm_head)."""
        if self.cfg.tie_word_embeddings:
            w = self.embed_tokens.embedding.T
        else:
            w = self.lm_head['kernel']
        return jnp.einsum('...d,dv->...v', h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def unembed_slice(self, h: jax.Array, start: jax.Array, size: int) -> jax.Array:
        """Float32 logits of vocabulary entries [start, start + size): h [..., D] -> [..., size],
        the same values as unembed(h)[..., start:start + size]; only that slice of the head is
        converted to the compute dtype (a bf16 head on CPU is computed in f32)."""
        if self.cfg.tie_word_embeddings:
            w = jax.lax.dynamic_slice_in_dim(self.embed_tokens.embedding, start, size, 0).T
        else:
            w = jax.lax.dynamic_slice_in_dim(self.lm_head['kernel'], start, size, 1)
        return jnp.einsum('...d,dv->...v', h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.unembed(self.hidden(tokens))

    def decode(self, tokens: jax.Array, cache: dict, pos: jax.Array):
        """tokens [B, T] at positions [pos, pos + T) -> (logits [B, T, V], updated cache)."""
        h, cache = self._run(tokens, pos + jnp.arange(tokens.shape[-1]), cache, pos)
        return self.unembed(h), cache


def init_params(cfg: LlamaConfig, rng: jax.Array) -> dict:
    """Random init of the ``params`` collection (float32; see :func:`cast_frozen`)."""
    validate(cfg)
    model = Llama(dataclasses.replace(cfg, remat=False))
    return jax.jit(model.init)(rng, jnp.zeros((1, 2), jnp.int32))['params']


def cast_frozen(params: dict, dtype: str) -> dict:
    """Casts the frozen floating-point weights to ``dtype`` (model.dtype), e.g. bf16; leaves
    already in ``dtype`` are returned as they are (no copy)."""
    return jax.tree.map(
        lambda x: x.astype(dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype) else x, params)


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of ``length`` positions S: {'k', 'v': [n_layer, B, S, G, d_h]}."""
    shape = (cfg.n_layer, batch, length, cfg.n_kv_head, cfg.d_head)
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def generate(model: Llama,
             variables: dict,
             prompt: jax.Array,
             steps: int,
             rng: jax.Array,
             temperature: float = 1.0) -> jax.Array:
    """Samples ``steps`` tokens after ``prompt`` [B, P] with a KV cache; returns [B, P + steps].

    Token t+1 ~ softmax(logits_t / temperature); temperature 0 is greedy (argmax). Jittable: one
    prefill of the prompt, then a lax.scan of single-token decode steps.
    """
    b, p = prompt.shape
    total = p + steps
    if total > model.cfg.n_positions:
        raise ValueError(f'sample length {total} exceeds model.n_positions={model.cfg.n_positions}')
    if temperature < 0:
        raise ValueError(f'temperature must be >= 0, got {temperature}')
    cache = init_cache(model.cfg, b, total, jnp.dtype(model.cfg.dtype))

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    keys = jax.random.split(rng, steps)
    logits, cache = model.apply(variables, prompt, cache, jnp.int32(0), method=Llama.decode)
    first = pick(logits[:, -1], keys[0])

    def step(carry, xs):
        tok, cache = carry
        t, key = xs
        logits, cache = model.apply(variables, tok[:, None], cache, t, method=Llama.decode)
        nxt = pick(logits[:, -1], key)
        return (nxt, cache), tok

    ts = jnp.arange(p, total - 1, dtype=jnp.int32)
    (last, _), toks = jax.lax.scan(step, (first, cache), (ts, keys[1:]))
    out = jnp.concatenate([toks.T, last[:, None]], axis=1) if steps > 1 else first[:, None]
    return jnp.concatenate([prompt.astype(jnp.int32), out], axis=1)
