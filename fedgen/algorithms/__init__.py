"""Federated methods: small modules over the shared round primitives (fedgen/fl/engine.py).

| method        | module      | trainable          | what differs                                  |
|---------------|-------------|--------------------|-----------------------------------------------|
| fedgen_edge   | fedavg      | LoRA adapters      | FedAvg of adapters over the frozen backbone   |
| fedavg_full   | fedavg      | every backbone leaf| full-model FedAvg (the uplink baseline)       |
| fedprox       | fedavg      | adapters (or full) | prox_mu > 0 (Li et al. 2020)                  |
| ditto         | ditto       | adapters           | a personal model per client (Li et al. 2021)  |
| fedsa         | fedsa       | adapters           | A shared, B local (Guo et al. 2024)           |
| local_only    | local_only  | adapters           | every client trains alone, nothing is sent    |
| centralized   | centralized | adapters           | one chain over the sampled clients' pool      |

FedAdam / FedYogi / FedAdagrad are any of these with that server optimizer. The server side is one
``fedgen.aggregators.Aggregator`` (``MethodParams.aggregator``); a method that cannot run with an
aggregator, a server optimizer or heterogeneous ranks says so when its MethodParams is built.
"""
import dataclasses
from typing import Optional

import jax
import optax
from jax.sharding import Mesh

from fedgen import aggregators
from fedgen.fl import engine
from fedgen.lora import adapters as lora
from fedgen.algorithms import centralized, ditto, fedavg, fedsa, local_only, optim
from fedgen.fl.algorithm import Algorithm

METHODS = ('fedgen_edge', 'fedavg_full', 'fedprox', 'ditto', 'fedsa', 'local_only', 'centralized')
PROX_TARGETS = ('lora', 'full')
# Methods that upload nothing to aggregate.
NO_UPLOAD = ('local_only', 'centralized')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters: rank r, scale alpha (W = W0 + (alpha/r) A B), target path rules or presets."""
    rank: int
    alpha: float
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Typed hyper-parameters of a method; the entry point builds them once from the config.

    name: one of METHODS (config ``fed.algorithm``); num_clients: N; chunk: clients per map;
    prox_mu: FedProx's mu (any method; fedprox requires > 0); prox_target: what fedprox trains;
    ditto_lambda: Ditto's lambda (> 0 for ditto); aggregator: the server's one Aggregator;
    server_opt: the server optimizer's spec (server_tx is built from it); faults: simulated
    faults; client_ranks: [N] LoRA ranks or None; log_diagnostics: publish statistics of raw
    client updates under DP (outside epsilon); fields: (attribute, caller's name) pairs that error
    messages use instead of the attribute names (e.g. ('chunk', 'fed.client_chunk')).
    """
    name: str
    num_clients: int
    client_tx: optax.GradientTransformation
    server_tx: optax.GradientTransformation
    lora: Optional[LoraSpec] = None
    chunk: int = 1
    prox_mu: float = 0.0
    prox_target: str = 'lora'
    ditto_lambda: float = 0.0
    aggregator: aggregators.Aggregator = aggregators.weighted_mean()
    server_opt: optim.ServerOptSpec = optim.ServerOptSpec()
    faults: engine.Faults = engine.Faults()
    client_ranks: Optional[tuple] = None
    log_diagnostics: bool = False
    fields: tuple[tuple[str, str], ...] = ()

    def field(self, attribute: str) -> str:
        """The name error messages give ``attribute``: the caller's (``fields``) or its own."""
        return dict(self.fields).get(attribute, attribute)

    def __post_init__(self):
        f = self.field
        if self.name not in METHODS:
            raise ValueError(f'{f("name")} must be one of {list(METHODS)}, got {self.name!r}')
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ValueError(f'{f("num_clients")} must be an int >= 1, got {self.num_clients!r}')
        if not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f'{f("chunk")} must be an int >= 1, got {self.chunk!r}')
        if self.prox_mu < 0:
            raise ValueError(f'{f("prox_mu")} must be >= 0, got {self.prox_mu}')
        if self.name == 'fedprox' and not self.prox_mu > 0:
            raise ValueError(f'{f("prox_mu")} must be > 0 for fedprox, got {self.prox_mu!r}')
        if self.prox_target not in PROX_TARGETS:
            raise ValueError(f'{f("prox_target")} must be one of {PROX_TARGETS}, got '
                             f'{self.prox_target!r}')
        if self.name == 'ditto' and not self.ditto_lambda > 0:
            raise ValueError(f'{f("ditto_lambda")} must be > 0 for ditto, got '
                             f'{self.ditto_lambda!r}')
        check_combination(self)

    @property
    def has_global(self) -> bool:
        """Whether the method trains a global model: FedSA's global B stays 0 (only A is
        shared) and local-only never averages, so neither has a model to evaluate globally."""
        return self.name not in ('fedsa', 'local_only')

    @property
    def full_model(self) -> bool:
        """Whether every backbone leaf is trainable (no adapters)."""
        return self.name == 'fedavg_full' or (self.name == 'fedprox' and self.prox_target == 'full')


def check_combination(p: MethodParams) -> None:
    """Refuses (one line naming both settings) what the method cannot run with."""
    f = p.field
    agg, method = p.aggregator, f'{f("name")}={p.name!r}'
    opt = f'{f("server_opt")}={p.server_opt.name!r}'
    sgd1 = p.server_opt.name == 'sgd' and p.server_opt.lr == 1.0
    if p.name in NO_UPLOAD:
        if agg.private:
            aggregators.refuse(
                agg.label, method, 'it uploads no model updates (local_only) or '
                'pools raw data (centralized), so there is nothing to privatise')
        if agg.individual or agg.sets_global or agg.client_frozen:
            aggregators.refuse(method, agg.label, 'it aggregates no client updates')
    if p.name == 'local_only' and not sgd1:
        aggregators.refuse(method, f'{opt} (lr {p.server_opt.lr})', 'there is no server step')
    if agg.sets_global and not sgd1:
        aggregators.refuse(
            agg.label, f'{opt} ({f("server_lr")}={p.server_opt.lr})',
            f"it sets the global adapter itself; use {f('server_opt')}='sgd' with "
            f'{f("server_lr")}=1.0')
    if (p.full_model or p.name == 'fedsa') and (agg.sets_global or agg.client_frozen):
        why = 'B never leaves the client' if p.name == 'fedsa' else 'there are no adapters'
        aggregators.refuse(agg.label, method, why)
    hetero = p.client_ranks is not None and len(set(p.client_ranks)) > 1
    if p.client_ranks is not None and (p.name in ('ditto', 'fedsa') or p.full_model
                                       or hetero and p.name in NO_UPLOAD):
        aggregators.refuse(
            f('client_ranks'), method, 'heterogeneous ranks run with '
            'fedgen_edge and fedprox on adapters (clients that start from the '
            'global adapter)')
    if p.client_ranks is not None and not agg.ranks:
        aggregators.refuse(
            f('client_ranks'), agg.label, 'the aggregator must average each rank '
            'slice over its owners (fedgen.aggregators.hetlora or a product one)')


def variables(p: MethodParams, backbone: dict, rng: jax.Array) -> tuple[dict, dict]:
    """(frozen, trainable): ({}, {'params': backbone}) for full-model methods, else
    ({'params': backbone}, {'lora': adapters}) with B = 0 (round 0 starts at the backbone)."""
    if p.full_model:
        return {}, {'params': backbone}
    name = p.field('lora')
    if p.lora is None:
        raise ValueError(f'{name}: adapter methods need a LoraSpec ({name}.rank, {name}.alpha, '
                         f'{name}.targets)')
    adapters = lora.init(rng, backbone, p.lora.targets, p.lora.rank, section=f'{name}.')
    return {'params': backbone}, {'lora': adapters}


def make(p: MethodParams, loss_fn, mesh: Mesh | None = None) -> Algorithm:
    """The method's Algorithm for a task's loss; ``mesh`` shards the client axis."""
    module = {
        'ditto': ditto,
        'fedsa': fedsa,
        'local_only': local_only,
        'centralized': centralized
    }.get(p.name, fedavg)
    return module.make(p, loss_fn, mesh)
