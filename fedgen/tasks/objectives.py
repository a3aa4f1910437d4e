"""Task losses. Every loss has the signature

    loss_fn(variables, batch, rng) -> (mean_loss, weight)

where ``variables`` is the linen variable dict ({'params': ..., 'lora': ...}), ``batch`` a dict of
arrays with a leading batch axis B and a per-example ``weight`` [B] (0 marks padding), and
``weight`` the number of loss units (tokens or images) the mean is over, so means can be combined
exactly across batches and clients as sum(mean * weight) / sum(weight).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array]]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: logits [..., V], targets [...] int -> [...] float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token_loss(model: nn.Module) -> LossFn:
    """Masked next-token cross-entropy for a causal LM.

    batch['tokens'] [B, T+1] int32, batch['weight'] [B]. With inputs x = tokens[:, :T] and targets
    y = tokens[:, 1:], the loss is

        L = sum_b w_b sum_t nll(b, t) / (T sum_b w_b),

    i.e. the mean NLL per predicted token (exp(L) is the word-level perplexity on PTB).
    """

    def loss_fn(variables, batch, rng):
        del rng
        tokens, w = batch['tokens'], batch['weight'].astype(jnp.float32)
        nll = token_nll(model.apply(variables, tokens[:, :-1]), tokens[:, 1:])
        count = w.sum() * nll.shape[1]
        return (nll.sum(-1) * w).sum() / jnp.maximum(count, 1.0), count

    return loss_fn


def vocab_chunked_nll(model: nn.Module, variables: dict, h: jax.Array, targets: jax.Array,
                      size: int) -> jax.Array:
    """-log softmax(unembed(h))[target] with the logits formed ``size`` vocabulary entries at a
    time: h [N, D], targets [N] int -> [N] float32.

    Over the vocabulary chunks c (entries [cs, (c+1)s), the last one cut at V), a running
    max m, sum s and target logit z:

        m' = max(m, max_v l_cv),  s' = s exp(m - m') + sum_v exp(l_cv - m'),  nll = m + log s - z

    (a final chunk shorter than s is read from V - s and its entries before cs are masked). The
    chunk body is rematerialized (``jax.checkpoint`` under ``lax.scan``), so the forward and the
    backward pass hold one [N, size] logits block, and one [size, D] slice of the head in the
    compute dtype, at a time; the saved residuals are m, s and z per chunk. Same values as the
    whole softmax up to float rounding.
    """
    vocab = model.cfg.vocab_size
    size = min(size, vocab)
    n = h.shape[0]

    @jax.checkpoint
    def body(carry, c):
        m, s, z = carry
        start = jnp.minimum(c * size, vocab - size)
        ids = start + jnp.arange(size)
        fresh = ids >= c * size  # entries no earlier chunk counted
        logits = model.apply(variables, h, start, size, method='unembed_slice')
        logits = jnp.where(fresh[None], logits.astype(jnp.float32), -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        z = z + jnp.where((targets[:, None] == ids[None]) & fresh[None], logits, 0.0).sum(-1)
        return (m_new, s, z), None

    init = (jnp.full((n, ), -jnp.inf, jnp.float32), jnp.zeros(
        (n, ), jnp.float32), jnp.zeros((n, ), jnp.float32))
    (m, s, z), _ = jax.lax.scan(body, init, jnp.arange(-(-vocab // size)))
    return m + jnp.log(s) - z


def token_nll_fn(model: nn.Module, chunk: int = 0, vocab_chunk: int = 0) -> Callable:
    """nll(variables, inputs [B, T], targets [B, T]) -> per-token NLL [B, T] float32.

    With ``chunk`` = 0 the [B, T, V] logits are formed at once. With ``chunk`` >= 1 (config
    model.ce_chunk) they are never materialized: the B T final hidden states (``model.hidden``)
    are cut into chunks of ``chunk`` tokens, and each chunk's logits come from ``model.unembed``
    inside ``jax.checkpoint`` under ``lax.map``, so the forward and the backward pass hold one
    [chunk, V] block at a time (the backward recomputes it). With ``vocab_chunk`` >= 1 (config
    model.ce_vocab_chunk) each block's (or the whole batch's) logits are formed ``vocab_chunk``
    vocabulary entries at a time (:func:`vocab_chunked_nll`). Same values and gradients.
    """
    if not (isinstance(chunk, int) and chunk >= 0):
        raise ValueError(f'chunk must be an int >= 0 (0: no chunking), got {chunk!r}')
    if not (isinstance(vocab_chunk, int) and vocab_chunk >= 0):
        raise ValueError(f'vocab_chunk must be an int >= 0 (0: no chunking), got {vocab_chunk!r}')

    def nll(variables, h, y):  # h [N, D], y [N] -> [N]
        if vocab_chunk:
            return vocab_chunked_nll(model, variables, h, y, vocab_chunk)
        return token_nll(model.apply(variables, h, method='unembed'), y)

    def whole(variables, inputs, targets):
        return token_nll(model.apply(variables, inputs), targets)

    def chunked(variables, inputs, targets):
        h = model.apply(variables, inputs, method='hidden')  # [B, T, D]
        b, t, d = h.shape
        if not chunk:
            return nll(variables, h.reshape(b * t, d), targets.reshape(b * t)).reshape(b, t)
        n, pad = b * t, -(b * t) % chunk
        hs = jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
        ys = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)

        @jax.checkpoint
        def block(xs):
            return nll(variables, xs[0], xs[1])

        return jax.lax.map(block, (hs, ys)).reshape(-1)[:n].reshape(b, t)

    return chunked if chunk or vocab_chunk else whole


def chunked_next_token_loss(model: nn.Module, chunk: int, vocab_chunk: int = 0) -> LossFn:
    """:func:`next_token_loss` with the chunked cross-entropy of :func:`token_nll_fn` (config
    model.ce_chunk and model.ce_vocab_chunk, at least one >= 1): same value and gradient, one
    [chunk, V] (or [chunk, vocab_chunk]) logits block at a time.
    """
    if not (isinstance(chunk, int) and isinstance(vocab_chunk, int) and chunk >= 0
            and vocab_chunk >= 0 and chunk + vocab_chunk >= 1):
        raise ValueError(f'chunk and vocab_chunk must be ints >= 0, one of them >= 1, got '
                         f'{chunk!r} and {vocab_chunk!r}')
    nll_fn = token_nll_fn(model, chunk, vocab_chunk)

    def loss_fn(variables, batch, rng):
        del rng
        tokens, w = batch['tokens'], batch['weight'].astype(jnp.float32)
        nll = nll_fn(variables, tokens[:, :-1], tokens[:, 1:])
        count = w.sum() * nll.shape[1]
        return (nll.sum(-1) * w).sum() / jnp.maximum(count, 1.0), count

    return loss_fn
