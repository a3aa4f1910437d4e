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

Sensitivity under quantization (the choice made here: clip tighter, keep the noise). Stochastic
rounding moves each coordinate by < 1.5 / s, so a dequantized update can be longer than its input:
    ||q_k / s|| <= ||x_k|| + 1.5 sqrt(D) / s.
The central noise is calibrated to S, so each update is clipped to
    S' = S - 1.5 sqrt(D) / s                                   (``quantization_clip_norm``)
before quantizing, and then ||q_k / s|| <= S: the released sum has sensitivity S, the value the
noise std z S is computed from. ``make_params(num_params=D)`` refuses S s <= 1.5 sqrt(D) (S' <= 0).
Under adaptive clipping the round's scale follows S_t (``round_scale``):
    s_t = min(s S_0 / S_t, max_scale(S_t, C, b)),
so the relative margin 1.5 sqrt(D) / (s_t S_t) never exceeds its value 1.5 sqrt(D) / (s S_0) at
S_0, which ``make_params`` checked (S s <= min((2^(b-1) - 1) / C - 2, 2^22) at any S).

Fast path: the pair masks cancel and the self masks are removed by construction, so the unmasked
total is exactly sum_{k in U2} q_k mod 2^b. ``ring_sum`` computes that sum directly, O(C D), and
``secure_sum`` uses it unless ``simulate_masks=True``, which runs steps 2-3 (O(C^2 D) PRG draws in
a lax.fori_loop over the partner slot, memory [C, D]). Both give the same bits (tested); no shape
depends on who took part or dropped.
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

# Per-coordinate bound on |q - x s| (rounding 1, plus 1/4 for each of two float32 roundings).
ROUNDING_SLACK = 1.5


@struct.dataclass
class SecAggParams:
    """SecAgg settings; ``scale`` is traced, ``bits`` and ``simulate_masks`` are static.

    scale: s, quantization levels per unit at the clip norm S_0 (``round_scale`` gives s_t).
    bits: b, the ring Z_{2^b}.
    simulate_masks: run the pairwise masking and recovery (O(C^2 D)); False sums the quantized
        updates in the ring directly (O(C D), the same bits).
    """
    scale: float
    bits: int = struct.field(pytree_node=False, default=32)
    simulate_masks: bool = struct.field(pytree_node=False, default=False)


def max_scale(clip_norm, num_clients: int, bits: int):
    """Largest s with n (S s + 2) <= 2^(b-1) - 1 and S s <= 2^22 (works on floats and jnp)."""
    ring = ((2.0**(bits - 1) - 1.0) / num_clients - 2.0) / clip_norm
    return jnp.minimum(ring, FLOAT_EXACT_LEVELS / clip_norm) if isinstance(
        clip_norm, jax.Array) else min(ring, FLOAT_EXACT_LEVELS / clip_norm)


def overflow_check(scale: float,
                   clip_norm: float,
                   num_clients: int,
                   bits: int,
                   *,
                   section: str = '') -> None:
    """Refuses a scale at which n clients of norm S can wrap around 2^b (one-line ValueError).

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if not 2 <= bits <= 32:
        raise ValueError(f'{section}secagg.bits must be in [2, 32], got {bits}')
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f'secure aggregation needs a finite {section}dp.clip_norm > 0, '
                         f'got {clip_norm}')
    bound = num_clients * (clip_norm * scale + 2.0)
    if not scale > 0 or bound > 2.0**(bits - 1) - 1:
        raise ValueError(f'{section}secagg scale {scale:g} overflows {bits} bits: n (S s + 2) = '
                         f'{bound:.4g} > 2^{bits - 1} - 1 for n = {num_clients} clients at '
                         f'S = {clip_norm:g}; the largest safe scale is '
                         f'{max_scale(clip_norm, num_clients, bits):.6g}')
    if clip_norm * scale > FLOAT_EXACT_LEVELS:
        raise ValueError(
            f'{section}secagg scale {scale:g}: S s = {clip_norm * scale:.4g} exceeds 2^22, '
            f'beyond float32 exact rounding; use s <= {FLOAT_EXACT_LEVELS / clip_norm:g}')


def quantization_margin(scale, num_params: int):
    """1.5 sqrt(D) / s: the most stochastic rounding can add to an update's L2 norm."""
    return ROUNDING_SLACK * math.sqrt(num_params) / scale


def quantization_clip_norm(clip_norm, scale, num_params: int):
    """S' = S - 1.5 sqrt(D) / s, floored at 0 (``make_params`` refuses S' <= 0 up front)."""
    s_prime = clip_norm - quantization_margin(scale, num_params)
    return jnp.maximum(s_prime, 0.0) if isinstance(s_prime, jax.Array) else max(s_prime, 0.0)


def round_scale(scale, clip_norm_0, clip_norm, num_clients: int, bits: int) -> jax.Array:
    """s_t = min(s S_0 / S_t, max_scale(S_t, C, b)) as float32 []; s_t = s when S_t = S_0."""
    s_t = jnp.asarray(clip_norm, jnp.float32)
    ratio = jnp.asarray(clip_norm_0, jnp.float32) / s_t
    return jnp.minimum(jnp.asarray(scale, jnp.float32) * ratio, max_scale(s_t, num_clients, bits))


def _min_bits(num_params: int, num_clients: int) -> int:
    """Smallest b <= 32 whose ring leaves S s > 1.5 sqrt(D) for C clients (33 when none does)."""
    need = ROUNDING_SLACK * math.sqrt(num_params)
    for b in range(2, 33):
        if min((2.0**(b - 1) - 1.0) / num_clients - 2.0, FLOAT_EXACT_LEVELS) > need:
            return b
    return 33


def quantization_check(scale: float,
                       clip_norm: float,
                       num_params: int,
                       num_clients: int,
                       bits: int,
                       *,
                       section: str = '') -> None:
    """Refuses S s <= 1.5 sqrt(D), where the SecAgg clip S' = S - 1.5 sqrt(D) / s is <= 0.

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    need = ROUNDING_SLACK * math.sqrt(num_params)
    if clip_norm * scale > need:
        return
    best = max_scale(clip_norm, num_clients, bits)
    if best * clip_norm > need:
        fix = (f'raise {section}secagg.scale (now {scale:.6g}; at most {best:.6g} at '
               f'{bits} bits)')
    elif _min_bits(num_params, num_clients) <= 32:
        fix = (f'raise {section}secagg.bits (now {bits}; {_min_bits(num_params, num_clients)} or '
               f'more fits {num_clients} clients)')
    else:
        fix = 'no ring of <= 32 bits fits: send fewer parameters or fewer clients per round'
    raise ValueError(
        f'{section}secagg: {section}dp.clip_norm x scale = '
        f'{clip_norm * scale:.4g} <= 1.5 sqrt(D) = {need:.4g} (D = {num_params} uploaded '
        f'parameters), so stochastic rounding could add more than the clip norm and the SecAgg '
        f'clip S - 1.5 sqrt(D) / s is <= 0; {fix}')


def make_params(clip_norm: float,
                num_clients: int,
                bits: int = 32,
                scale: float = 0.0,
                num_params: int = 0,
                simulate_masks: bool = False,
                *,
                section: str = '') -> SecAggParams:
    """Validated SecAggParams; scale 0 picks ``max_scale`` for capacity ``num_clients``.

    num_params: D, coordinates of one client's upload as ``private_mean`` sees it; when given
    (> 0), S s <= 1.5 sqrt(D) is refused here (``quantization_check``).
    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    if scale == 0.0 and 2 <= bits <= 32 and 0 < clip_norm < math.inf:
        scale = max_scale(clip_norm, num_clients, bits)
    overflow_check(scale, clip_norm, num_clients, bits, section=section)
    if num_params:
        quantization_check(scale, clip_norm, num_params, num_clients, bits, section=section)
    return SecAggParams(float(scale), int(bits), bool(simulate_masks))


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
def ring_sum(q: jax.Array, participants: jax.Array, survived: jax.Array, bits: int) -> jax.Array:
    """sum_{k in U1 and U2} q_k mod 2^b, [D] uint32: what unmasking leaves, without the masks."""
    kept = participants.astype(bool) & survived.astype(bool)
    return server_sum(q, kept, bits)


@functools.partial(jax.jit, static_argnames=('bits', 'simulate_masks'))
def secure_sum(flat: jax.Array,
               ids: jax.Array,
               participants: jax.Array,
               survived: jax.Array,
               scale,
               bits: int,
               key: jax.Array,
               simulate_masks: bool = False) -> Tuple[jax.Array, dict]:
    """(sum_{k in U2} q_k / s as float32 [D], metrics); masks simulated iff ``simulate_masks``."""
    q = quantize(flat, ids, scale, bits, key)
    if simulate_masks:
        y = mask(q, ids, participants, bits, key)
        total = unmask(server_sum(y, survived, bits), ids, participants, survived, bits, key)
    else:
        total = ring_sum(q, participants, survived, bits)
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
