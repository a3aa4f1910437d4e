"""Simulated secure aggregation by pairwise masking (Bonawitz et al. 2017, CCS), over [C] clients.

Shapes: ``flat`` is [C, D] float32 (each client's clipped update as one vector), ``ids`` [C] int32
distinct client ids, ``participants`` [C] (clients that masked their input: the protocol's U1),
``survived`` [C] (participants whose masked input reached the server: U2, a subset of U1).
All integers live in Z_{2^b} (b = ``bits`` <= 32), stored as uint32; uint32 arithmetic wraps mod
2^32 and 2^b divides 2^32, so reducing with ``& (2^b - 1)`` at the end is exact.

1. Quantize (client k, stochastic rounding with a per-client key):
       q_k = floor(x_k s + u_k),  u_k ~ U[0, 1)^D,      E[q_k] = x_k s,
   stored as q_k mod 2^b. With |x s| <= 2^22 (float32 keeps the product within 1/4) every
   coordinate satisfies |q_k - x_k s| < 1.5, and |q_k| <= S s + 2 for ||x_k|| <= S.
2. Mask (double masking): pair seeds s_jk = PRG key of (round key, min(id), max(id)) stand for the
   Diffie-Hellman agreement of j and k; self seeds b_k are per-client.
       y_k = q_k + PRG(b_k) + sum_{j in U1, id_j > id_k} PRG(s_kj) - sum_{j in U1, id_j < id_k}
             PRG(s_jk)   (mod 2^b).
   The pair masks cancel in sum_{k in U1} y_k; any single y_k is uniform on Z_{2^b}.
3. Unmask: the server holds Y = sum_{k in U2} y_k. Survivors' Shamir shares reveal b_k for
   k in U2 and the pair seeds of the dropped clients j in U1 \\ U2, so the server subtracts
       sum_{k in U2} [PRG(b_k) + sum_{j in U1 \\ U2} sign(k, j) PRG(s_kj)]
   and obtains sum_{k in U2} q_k exactly. Decoding it as a signed b-bit integer is exact when
   n (S s + 2) <= 2^(b-1) - 1 (``overflow_check``).
4. Dequantize: sum_k x_k ~= (sum_k q_k) / s, with a per-coordinate error < 1.5 n / s (worst case;
   standard deviation <= sqrt(n) / (2 s) from stochastic rounding), plus the float32 rounding of
   the result (relative 2^-24).

The simulation computes every client's PRG expansions, O(C^2 D) draws a round, in a lax.fori_loop
over the partner slot (memory [C, D]); no shape depends on who took part or dropped.
Shamir sharing is not simulated arithmetically: the server's recovery step uses exactly the seeds
that a threshold of surviving shares would reveal, and ``protocol_bytes`` counts those shares.
"""
import functools
import math
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PyTree = Any

# |x s| <= 2^22 keeps float32 x*s and x*s + u within 1/4 of exact each: the rounding bound 1.5.
FLOAT_EXACT_LEVELS = 2.0**22

_QUANT, _PAIR, _SELF = 1, 2, 3  # fold_in tags separating the round key's uses

_jit_bits = functools.partial(jax.jit, static_argnames=('bits', ))


@struct.dataclass
class SecAggParams:
    """Quantization scale s (levels per unit, traced) and ring size 2^bits (static)."""
    scale: float
    bits: int = struct.field(pytree_node=False, default=32)


def max_scale(clip_norm, num_clients: int, bits: int):
    """Largest s with n (S s + 2) <= 2^(b-1) - 1 and S s <= 2^22 (works on floats and jnp)."""
    ring = ((2.0**(bits - 1) - 1.0) / num_clients - 2.0) / clip_norm
    return jnp.minimum(ring, FLOAT_EXACT_LEVELS / clip_norm) if isinstance(
        clip_norm, jax.Array) else min(ring, FLOAT_EXACT_LEVELS / clip_norm)


def overflow_check(scale: float, clip_norm: float, num_clients: int, bits: int) -> None:
    """Refuses a scale at which n clients of norm S can wrap around 2^b (one-line ValueError)."""
    if not 2 <= bits <= 32:
        raise ValueError(f'fed.secagg.bits must be in [2, 32], got {bits}')
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f'secure aggregation needs a finite fed.dp.clip_norm > 0, got {clip_norm}')
    bound = num_clients * (clip_norm * scale + 2.0)
    if not scale > 0 or bound > 2.0**(bits - 1) - 1:
        raise ValueError(f'fed.secagg scale {scale:g} overflows {bits} bits: n (S s + 2) = '
                         f'{bound:.4g} > 2^{bits - 1} - 1 for n = {num_clients} clients at '
                         f'S = {clip_norm:g}; the largest safe scale is '
                         f'{max_scale(clip_norm, num_clients, bits):.6g}')
    if clip_norm * scale > FLOAT_EXACT_LEVELS:
        raise ValueError(
            f'fed.secagg scale {scale:g}: S s = {clip_norm * scale:.4g} exceeds 2^22, '
            f'beyond float32 exact rounding; use s <= {FLOAT_EXACT_LEVELS / clip_norm:g}')


def make_params(clip_norm: float, num_clients: int, bits: int = 32, scale: float = 0.0):
    """Validated SecAggParams; scale 0 picks ``max_scale`` for capacity ``num_clients``."""
    if scale == 0.0 and 2 <= bits <= 32 and 0 < clip_norm < math.inf:
        scale = max_scale(clip_norm, num_clients, bits)
    overflow_check(scale, clip_norm, num_clients, bits)
    return SecAggParams(float(scale), int(bits))


def flatten(stacked: PyTree) -> Tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """([C, D] float32 concatenation of every leaf, unflatten: [D] -> one client's tree)."""
    leaves, treedef = jax.tree.flatten(stacked)
    shapes = [x.shape[1:] for x in leaves]
    dtypes = [x.dtype for x in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], 1)

    def unflatten(vec):
        parts = jnp.split(vec, np.cumsum(sizes)[:-1])
        return treedef.unflatten([p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes)])

    return flat, unflatten


def _ring_mask(bits: int):
    return jnp.uint32((1 << bits) - 1)


def _prg(key: jax.Array, d: int, bits: int) -> jax.Array:
    return jax.random.bits(key, (d, ), jnp.uint32) & _ring_mask(bits)


@_jit_bits
def quantize(flat: jax.Array, ids: jax.Array, scale, bits: int, key: jax.Array) -> jax.Array:
    """q_k = floor(x_k s + u_k) mod 2^b as uint32 [C, D]; u_k from (key, id_k)."""
    qkey = jax.random.fold_in(key, _QUANT)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(qkey, i), flat.shape[1:]))(ids)
    q = jnp.floor(flat * jnp.asarray(scale, jnp.float32) + u).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(q, jnp.uint32) & _ring_mask(bits)


def _pair_key(key: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The simulated agreed seed of the unordered pair {a, b}."""
    return jax.random.fold_in(jax.random.fold_in(key, jnp.minimum(a, b)), jnp.maximum(a, b))


@functools.partial(jax.jit, static_argnames=('d', 'bits'))
def pair_mask_sums(ids: jax.Array, weight: jax.Array, d: int, bits: int,
                   key: jax.Array) -> jax.Array:
    """[C, D]: row k = sum_j weight[k, j] sign(k, j) PRG(s_kj) mod 2^b; sign +1 iff id_k < id_j."""
    pkey = jax.random.fold_in(key, _PAIR)

    def body(j, acc):
        prg = jax.vmap(lambda i: _prg(_pair_key(pkey, i, ids[j]), d, bits))(ids)
        w = weight[:, j]
        plus = (w & (ids < ids[j]))[:, None]
        minus = (w & (ids > ids[j]))[:, None]
        zero = jnp.uint32(0)
        return acc + jnp.where(plus, prg, zero) - jnp.where(minus, prg, zero)

    acc = jnp.zeros((ids.shape[0], d), jnp.uint32)
    return jax.lax.fori_loop(0, ids.shape[0], body, acc) & _ring_mask(bits)


@functools.partial(jax.jit, static_argnames=('d', 'bits'))
def self_masks(ids: jax.Array, d: int, bits: int, key: jax.Array) -> jax.Array:
    """[C, D] PRG(b_k)."""
    skey = jax.random.fold_in(key, _SELF)
    return jax.vmap(lambda i: _prg(jax.random.fold_in(skey, i), d, bits))(ids)


@_jit_bits
def mask(q: jax.Array, ids: jax.Array, participants: jax.Array, bits: int,
         key: jax.Array) -> jax.Array:
    """y_k = q_k + PRG(b_k) + pair masks with every other participant (mod 2^b); 0 off U1."""
    part = participants.astype(bool)
    pairs = part[:, None] & part[None, :] & (ids[:, None] != ids[None, :])
    d = q.shape[1]
    y = q + self_masks(ids, d, bits, key) + pair_mask_sums(ids, pairs, d, bits, key)
    return jnp.where(part[:, None], y & _ring_mask(bits), jnp.uint32(0))


@_jit_bits
def server_sum(y: jax.Array, survived: jax.Array, bits: int) -> jax.Array:
    """Y = sum over survivors of the masked inputs, mod 2^b: all the server receives. [D]."""
    kept = jnp.where(survived.astype(bool)[:, None], y, jnp.uint32(0))
    return jnp.sum(kept, axis=0, dtype=jnp.uint32) & _ring_mask(bits)


@_jit_bits
def unmask(total: jax.Array, ids: jax.Array, participants: jax.Array, survived: jax.Array,
           bits: int, key: jax.Array) -> jax.Array:
    """Recovery step: Y minus survivors' self masks and their pair masks with dropped clients."""
    part = participants.astype(bool)
    surv = survived.astype(bool) & part
    dropped = part & ~surv
    d = total.shape[0]
    pairs = surv[:, None] & dropped[None, :] & (ids[:, None] != ids[None, :])
    per_client = self_masks(ids, d, bits, key) + pair_mask_sums(ids, pairs, d, bits, key)
    residual = jnp.sum(jnp.where(surv[:, None], per_client, jnp.uint32(0)), 0, dtype=jnp.uint32)
    return (total - residual) & _ring_mask(bits)


@_jit_bits
def to_signed(v: jax.Array, bits: int) -> jax.Array:
    """Z_{2^b} as uint32 -> the representative in [-2^(b-1), 2^(b-1)) as int32 (sign extension)."""
    shift = jnp.uint32(32 - bits)
    return jax.lax.bitcast_convert_type(v << shift, jnp.int32) >> shift.astype(jnp.int32)


@_jit_bits
def secure_sum(flat: jax.Array, ids: jax.Array, participants: jax.Array, survived: jax.Array, scale,
               bits: int, key: jax.Array) -> Tuple[jax.Array, dict]:
    """The whole protocol: (sum_{k in U2} q_k / s as float32 [D], metrics)."""
    q = quantize(flat, ids, scale, bits, key)
    y = mask(q, ids, participants, bits, key)
    total = unmask(server_sum(y, survived, bits), ids, participants, survived, bits, key)
    out = to_signed(total, bits).astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
    part = participants.astype(jnp.float32)
    surv = survived.astype(jnp.float32) * part
    return out, {
        'secagg_scale': jnp.asarray(scale, jnp.float32),
        'secagg_dropped': (part - surv).sum(),
        'secagg_survived': surv.sum(),
    }


def protocol_bytes(num_params: int,
                   num_clients: int,
                   bits: int = 32,
                   key_bytes: int = 32,
                   share_bytes: int = 32,
                   id_bytes: int = 4,
                   aead_overhead: int = 28) -> dict:
    """Uplink bytes of one surviving client in one round of SecAgg over n = num_clients.

    Model (Bonawitz et al. 2017, full graph; X25519 keys, AES-GCM with 12 B nonce + 16 B tag):
      advertise_keys: 2 public keys (pair-mask and encryption), 2 key_bytes;
      share_keys:     n-1 ciphertexts, each two Shamir shares (of the pair-mask secret key and of
                      b_k) plus both ids: (n-1) (2 share_bytes + 2 id_bytes + aead_overhead);
      masked_input:   ceil(D bits / 8) (bits per coordinate, packed; D = num_params);
      unmasking:      one share per other U1 client (b_j of a survivor or the secret key of a
                      dropout) with its id: (n-1) (share_bytes + id_bytes).
    Downlink (the server relaying keys and ciphertexts) is not counted here.
    """
    others = num_clients - 1
    out = {
        'advertise_keys': 2 * key_bytes,
        'share_keys': others * (2 * share_bytes + 2 * id_bytes + aead_overhead),
        'masked_input': math.ceil(num_params * bits / 8),
        'unmasking': others * (share_bytes + id_bytes),
    }
    out['total'] = sum(out.values())
    out['overhead'] = out['total'] - out['masked_input']
    return out
