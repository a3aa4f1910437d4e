"""DP-FedAvg as an aggregator: clip -> (secure) sum -> Gaussian noise -> divide by the expected
count, the production path of :func:`fedgen.privacy.private_mean`.

    delta = (sum_{k in U} clip(u_k, S_t) + N(0, (z_D S_t)^2 I)) / m

U: the clients whose upload arrived (ctx.live) among those that took part (ctx.sampled); the
weights n_k are ignored (uniform weights bound the sensitivity by S). With no client in U the
update is noise only: a valid, accounted round. Like TFF's DifferentiallyPrivateFactory with an
inner SecureSumFactory, ``secagg`` makes the inner sum the simulated secure sum over quantized
clipped updates; the server adds the noise after unmasking.

Metrics: the noised aggregate's statistics are covered by epsilon; the ones computed from raw
client updates (privacy.DIAGNOSTIC_METRICS) are listed in the ``diagnostics`` trait, and the round
drops them unless the run asks for them (``fed.dp.log_diagnostics``, fedgen.fl.engine.publish).
"""
from typing import Optional

from fedgen import privacy
from fedgen.aggregators.base import Aggregator
from fedgen.privacy import DPParams, SecAggParams


def dp_mean(params: DPParams,
            secagg: Optional[SecAggParams] = None,
            label: str = 'dp_mean',
            secagg_label: str = 'secagg') -> Aggregator:
    """The private mean; state = the clip state (S_t, adaptive or fixed)."""
    outside = tuple(privacy.DIAGNOSTIC_METRICS)

    def init(tree):
        del tree
        return privacy.init(params)

    def agg(updates, weights, state, key, ctx):
        del weights
        mean, state, metrics = privacy.private_mean(updates, ctx.sampled, state, key, params,
                                                    secagg, ctx.ids, ctx.live)
        return mean, state, metrics

    return Aggregator(init,
                      agg,
                      label if secagg is None else f'{label} + {secagg_label}',
                      private=True,
                      diagnostics=outside)
