"""LoRA-specific aggregators (the math and the aggregation error: fedgen.aggregators.lora_math).

Updates are the clients' adapter deltas u_k = (A_k - A_G, B_k - B_G) under the key 'lora'; the
clients' adapters are A_G + u_k. With p_k = w_k / sum_j w_j and s = alpha / r:

- ``ffa(inner)`` (FFA-LoRA): A stays at its init on every client (``client_frozen``), clients send
  B only, and ``inner`` reduces the B updates: the mean of B is the mean of the products, exactly.
  Composes with any inner: DP clips and noises B, SecAgg sums B, a robust reduction reduces B.
- ``hetlora(inner)`` (heterogeneous ranks r_k <= r_max, masks ctx.rank_mask): with the plain mean,
  rank slice j is the weighted mean over the clients that own it (HetLoRA's zero-padding mean; a
  slice no client owns keeps its value). With DP the zero-padded factors are clipped as one
  vector per client and the noised sum is divided by the expected count m for every slice (an
  estimate biased toward 0 on slices few clients own, the price of a fixed sensitivity).
  Robust reductions are refused: zero padding would count as votes.
- ``product(method, ...)``: FedEx-LoRA (``exact_residual``), FlexLoRA (``svd_refactor``) and FLoRA
  (``stack``) build the next global adapter from the individual products A_k B_k, so they read
  individual updates and keep (FedEx, FLoRA) a frozen dW; they run with the plain mean only.
"""
import jax
import jax.numpy as jnp
from flax import traverse_util

from fedgen.aggregators import lora_math as lora_aggregation
from fedgen.lora import ranks as lora_ranks
from fedgen.aggregators import lora_rules
from fedgen.aggregators.base import Aggregator, refuse
from fedgen.aggregators.reductions import weighted_mean


def _b_only(tree):
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] != 'a'})


def ffa(inner: Aggregator, label: str = 'ffa') -> Aggregator:
    """FFA-LoRA around ``inner``: A frozen and never sent; ``inner`` sees the B updates only."""
    if inner.sets_global:
        refuse(label, inner.label, 'both set the global adapter')

    def upload(tree):
        if not isinstance(tree, dict) or 'lora' not in tree:
            return tree
        return {**tree, 'lora': _b_only(tree['lora'])}

    return inner._replace(upload=lambda tree: upload(inner.upload(tree)),
                          client_frozen=tuple(sorted(set(inner.client_frozen) | {'a'})),
                          label=f'{label} + {inner.label}')


def hetlora(inner: Aggregator, label: str = 'hetlora') -> Aggregator:
    """Heterogeneous ranks around ``inner`` (see the module docstring)."""
    if inner.individual:
        refuse(
            label, inner.label, 'a robust reduction over zero-padded adapters would count the '
            'padding as votes; use the mean')
    if inner.sets_global:
        return inner  # the product aggregators apply the rank masks themselves
    masked = lambda u, ctx: {**u, 'lora': lora_ranks.mask_adapters(u['lora'], ctx.rank_mask)}
    if inner.private:

        def agg_private(updates, weights, state, key, ctx):
            return inner.aggregate(masked(updates, ctx), weights, state, key, ctx)

        return inner._replace(aggregate=agg_private, label=f'{label} + {inner.label}', ranks=True)

    def agg(updates, weights, state, key, ctx):
        updates = masked(updates, ctx)
        rest = {k: v for k, v in updates.items() if k != 'lora'}
        out, state, metrics = inner.aggregate(rest, weights, state, key, ctx) if rest else ({},
                                                                                            state,
                                                                                            {})
        zero = jax.tree.map(lambda x: jnp.zeros_like(x[0]), updates['lora'])
        out = {**out, 'lora': lora_ranks.sliced_mean(updates['lora'], weights, ctx.rank_mask, zero)}
        return out, state, metrics

    return inner._replace(aggregate=agg, label=f'{label} + {inner.label}', ranks=True)


def product(method: str,
            alpha: float,
            residual_rank: int | None = None,
            inner: Aggregator | None = None,
            label: str = '',
            *,
            section: str = '') -> Aggregator:
    """FedEx-LoRA / FlexLoRA / FLoRA (``method`` in lora_aggregation.NO_SERVER_OPT).

    state {'delta': dW per adapted kernel}. Being ``sets_global``, it returns the next global
    tree itself in place of a delta ({'lora': new adapter}; the server step is sgd(1.0) by
    construction, applied exactly). FLoRA re-draws A from the round's server key.
    section: the caller's prefix for the names in error messages and the default label, e.g.
    'fed.'."""
    label = label or f'{section}lora_aggregation={method!r}'
    if method not in lora_aggregation.NO_SERVER_OPT:
        raise ValueError(f'{section}lora_aggregation: {method!r} is not a product aggregator; '
                         f'one of {lora_aggregation.NO_SERVER_OPT}')
    if inner is not None and (inner.private or inner.individual or inner.diagnostics):
        why = ('the server needs each client\'s factors A_k, B_k to form sum_k p_k A_k B_k; '
               'clipping and noising the sum of factors does not bound that product'
               if inner.private else 'both read the individual updates; combine them by hand')
        refuse(label, inner.label, why)
    impl = lora_rules.make(lora_rules.LoraAggregation(method, alpha, residual_rank))
    with_delta = method in lora_aggregation.WITH_DELTA

    def init(tree):
        return impl.init(tree['lora'])

    def agg(updates, weights, state, key, ctx):
        g = ctx.global_tree['lora']
        clients = lora_aggregation.client_adapters(g, updates['lora'])
        state, new, metrics = impl.aggregate(state, g, clients, weights, ctx.rank_mask, key)
        return {'lora': new}, state, metrics

    return Aggregator(init,
                      agg,
                      label,
                      individual=True,
                      sets_global=True,
                      ranks=True,
                      frozen_delta=(lambda state: state['delta']) if with_delta else None)


def fedex(alpha: float, residual_rank: int | None = None, **kw) -> Aggregator:
    """FedEx-LoRA: (Abar, Bbar) and dW += s (P - Abar Bbar) (rank-k SVD with ``residual_rank``)."""
    return product('exact_residual', alpha, residual_rank, **kw)


def flexlora_svd(alpha: float, **kw) -> Aggregator:
    """FlexLoRA: the balanced rank-r truncated SVD of P (heterogeneous ranks download a slice)."""
    return product('svd_refactor', alpha, **kw)


def flora_stack(alpha: float, **kw) -> Aggregator:
    """FLoRA: the clients' stacked factors folded into dW; the adapter restarts every round."""
    return product('stack', alpha, **kw)


def with_error(inner: Aggregator) -> Aggregator:
    """``inner`` plus the LoRA aggregation error of this round's clients (lora_agg_error, the
    pooled ||P - Abar Bbar|| / ||P||, and lora_agg_error_mean over modules); a statistic of the
    individual updates, so it is a diagnostic (outside epsilon under DP)."""

    def agg(updates, weights, state, key, ctx):
        delta, state, metrics = inner.aggregate(updates, weights, state, key, ctx)
        if 'lora' in updates and lora_aggregation.has_modules(updates['lora']):
            clients = lora_aggregation.client_adapters(ctx.global_tree['lora'], updates['lora'])
            err = lora_aggregation.aggregation_error(clients, clients, weights, ctx.rank_mask)
            metrics = {**metrics, 'lora_agg_error': err.total, 'lora_agg_error_mean': err.mean}
        return delta, state, metrics

    return inner._replace(aggregate=agg,
                          diagnostics=inner.diagnostics + ('lora_agg_error', 'lora_agg_error_mean'))


__all__ = [
    'fedex', 'ffa', 'flexlora_svd', 'flora_stack', 'hetlora', 'product', 'with_error',
    'weighted_mean'
]
