"""Client fates as masks: dropouts and stragglers, drawn inside the compiled round.

A sampled client k either reports (report_k = 1) or drops after the download (report_k = 0), and a
straggler completes only the first ceil(f_k * S_k) of its S_k real local steps:

    u_drop, u_strag, u_frac ~ U[0, 1) from fold_in(key, id_k)
    report_k = 1[u_drop >= dropout]
    f_k      = min_frac + (1 - min_frac) * u_frac   if u_strag < straggler   else 1

Shapes: client_ids [C] int32 -> report [C] f32 in {0, 1}, step_frac [C] f32 in [min_frac, 1].
The rates are traced values (a ``FateRates`` pytree), so changing them never recompiles. Each
client's fate depends only on (key, id), and the engine folds (seed, round) into ``key``, so a
resumed run draws the same fates as an unbroken one.
"""
import math

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class FateRates:
    """Traced fate rates (scalars): fed.dropout_rate, fed.straggler_rate, fed.straggler_min_frac."""
    dropout: jax.Array
    straggler: jax.Array
    straggler_min_frac: jax.Array

    @classmethod
    def of(cls, dropout: float, straggler: float, straggler_min_frac: float) -> 'FateRates':
        """Rates as float32 scalars (validated by :func:`check_rates` first)."""
        return cls(jnp.float32(dropout), jnp.float32(straggler), jnp.float32(straggler_min_frac))


@flax.struct.dataclass
class Fates:
    report: jax.Array  # [C] f32: 1 if the client uploads, 0 if it dropped
    step_frac: jax.Array  # [C] f32: share of its real local steps the client completes


def _one(key: jax.Array, client_id: jax.Array, rates: FateRates) -> tuple[jax.Array, jax.Array]:
    u = jax.random.uniform(jax.random.fold_in(key, client_id), (3, ))
    report = (u[0] >= rates.dropout).astype(jnp.float32)
    lo = rates.straggler_min_frac.astype(jnp.float32)
    frac = jnp.where(u[1] < rates.straggler, lo + (1.0 - lo) * u[2], 1.0)
    return report, frac.astype(jnp.float32)


def draw(key: jax.Array, client_ids: jax.Array, rates: FateRates) -> Fates:
    """Each client's fate from ``fold_in(key, client_id)``; ``key`` already holds (seed, round)."""
    report, frac = jax.vmap(_one, in_axes=(None, 0, None))(key, client_ids.astype(jnp.int32), rates)
    return Fates(report=report, step_frac=frac)


def apply_steps(mask: jax.Array, step_frac: jax.Array) -> jax.Array:
    """Keeps the first ceil(f_k * S_k) real steps of client k, where S_k = sum_s mask[k, s].

    mask [C, S] (1 = real step, 0 = padding; real steps need not be contiguous), step_frac [C]
    -> mask [C, S] of the same dtype. A straggler with S_k >= 1 keeps at least one step.
    """
    m = (mask > 0).astype(jnp.float32)
    real = m.sum(axis=1)
    keep = jnp.ceil(step_frac.astype(jnp.float32) * real)
    seen = jnp.cumsum(m, axis=1)  # real steps up to and including s
    return (m * (seen <= keep[:, None])).astype(mask.dtype)


def over_select(clients_per_round: int, x: float) -> int:
    """ceil(C * (1 + x)) clients to sample so that about C report (fed.over_select = x)."""
    # round() first so that e.g. 10 * 1.1 = 11.000000000000002 is not lifted to 12.
    return int(math.ceil(round(clients_per_round * (1.0 + x), 9)))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rates(dropout: float,
                straggler: float,
                min_frac: float,
                over_select: float,
                *,
                section: str = '') -> None:
    """One-line ValueError naming the field (dropout_rate, straggler_rate, straggler_min_frac,
    over_select) when a rate is out of range (before compute).

    section: the caller's prefix for the names in error messages, e.g. 'fed.'.
    """
    for field, v in (('dropout_rate', dropout), ('straggler_rate', straggler), ('over_select',
                                                                                over_select)):
        if not (_number(v) and 0.0 <= v < 1.0):
            raise ValueError(f'{section}{field} must be a number in [0, 1), got {v!r}')
    if not (_number(min_frac) and 0.0 < min_frac <= 1.0):
        raise ValueError(f'{section}straggler_min_frac must be a number in (0, 1], '
                         f'got {min_frac!r}')
