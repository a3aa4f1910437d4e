"""Server aggregation: one typed, composable :class:`Aggregator` per run (see base.py).

| block                         | module        | reads individual updates | private |
|-------------------------------|---------------|--------------------------|---------|
| weighted_mean                 | reductions    | no                       | no      |
| median, trimmed_mean,         | reductions    | yes                      | no      |
| norm_bound, multi_krum,       |               |                          |         |
| geometric_median              |               |                          |         |
| clip_to + chain               | base          | (per client)             | no      |
| dp_mean (clip, [secure] sum,  | private       | no                       | yes     |
| noise, divide by expected m)  |               |                          |         |
| ffa(inner), hetlora(inner)    | lora          | as inner                 | as inner|
| product: FedEx, FlexLoRA,     | lora          | yes (sets the global)    | no      |
| FLoRA                         |               |                          |         |

The engine takes exactly one aggregator; a combination that cannot be defined is refused when it
is built (``refuse``: one line naming both settings).
"""
from fedgen.aggregators.base import (Aggregator, ClientTransform, RoundContext, chain, clip_to,
                                     refuse, zero_like_upload)
from fedgen.aggregators.lora import (fedex, ffa, flexlora_svd, flora_stack, hetlora, product,
                                     with_error)
from fedgen.aggregators.private import dp_mean
from fedgen.aggregators.reductions import (client_drift, geometric_median, median, multi_krum,
                                           norm_bound, robust_reduction, trimmed_mean,
                                           weighted_mean)

__all__ = [
    'Aggregator', 'ClientTransform', 'RoundContext', 'chain', 'clip_to', 'client_drift', 'dp_mean',
    'fedex', 'ffa', 'flexlora_svd', 'flora_stack', 'geometric_median', 'hetlora', 'median',
    'multi_krum', 'norm_bound', 'product', 'refuse', 'robust_reduction', 'trimmed_mean',
    'weighted_mean', 'with_error', 'zero_like_upload'
]
