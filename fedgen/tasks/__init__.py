"""The task contract: what the federated loop needs from a task, as one typed value.

A task module (``fedgen.tasks.ptb``, ``fedgen.tasks.cifar10``) exposes a frozen ``Settings``
dataclass (its typed hyper-parameters, whose sections mirror the config's: the entry point builds it
once, see experiments/translate.py) and ``prepare(settings) -> Task``.
Every task has the fields below; optional capabilities are explicit fields that are ``None`` (or
empty) when a task lacks them, never discovered with ``hasattr``:

- ``classes``: class names, for tasks whose examples carry labels (per-client label histograms);
- ``aux_nets``: evaluation networks the evaluator needs (e.g. the fd_classifier CNN), each with a
  recipe (its cache key) and a ``build()`` that trains it;
- ``client_metric``: the per-client personalization metric as a function of a mean loss
  (text: perplexity = exp(L); images: the denoising MSE itself).

Example dicts map field -> [N, ...] arrays; client splits are index arrays into ``pool``.
"""
import dataclasses
import importlib
from typing import Any, Callable, Optional

import numpy as np

from fedgen.fl.algorithm import check_ema_decay

PyTree = Any
TASKS = ('ptb', 'cifar10', 'brown')
SAMPLE_KINDS = ('text', 'images')
# The config's names for the parameters of fedgen.data.partition's splits (their ``names``), so
# that a split's errors name the field a task's Settings took the value from.
PARTITION_NAMES = {
    'num_clients': 'fed.num_clients',
    'kind': 'data.partition.kind',
    'alpha': 'data.partition.alpha',
    'min_size': 'data.partition.min_size',
    'k': 'data.partition.k',
    'test_fraction': 'data.partition.local_test_fraction',
}


@dataclasses.dataclass(frozen=True)
class Partition:
    """How the client pool is split (data.partition): kind, Dirichlet alpha, minimum client size,
    each client's local test share and its unit (``local_test_unit``: random 'window's, or whole
    'document's of ``doc_windows`` consecutive windows, text only: no test text is trained on);
    topic clustering (text) and k classes (k_classes)."""
    kind: str
    alpha: float
    min_size: int
    local_test_fraction: float
    num_topics: int = 10
    doc_windows: int = 8
    k: int = 2
    local_test_unit: str = 'window'


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """Central pre-training of the backbone on the public portion (config section pretrain).
    ema_decay > 0: the backbone is the EMA of the weights over the steps (fedgen.fl.pretrain)."""
    steps: int
    batch_size: int
    opt: str
    lr: float
    backbone_path: str = ''
    ema_decay: float = 0.0

    def check(self, *, section: str = '') -> None:
        """ema_decay: a number in [0, 1), and > 0 only with steps > 0 (something to average).
        section: the caller's prefix for the field names in the messages."""
        check_ema_decay(self.ema_decay, section=section)
        if self.ema_decay and self.steps == 0:
            raise ValueError(f'{section}ema_decay={self.ema_decay} needs {section}steps > 0 '
                             '(with 0 steps nothing is pre-trained to average)')

    def recipe(self) -> dict:
        """The fields that determine the pre-trained weights (not where they are loaded from);
        ema_decay only when on, so the backbones cached without it keep their keys."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != 'backbone_path'}
        if not self.ema_decay:
            del out['ema_decay']
        return out


@dataclasses.dataclass(frozen=True)
class Population:
    """The population a task is split for (config fed.num_clients, fed.clients_per_round)."""
    num_clients: int
    clients_per_round: int


@dataclasses.dataclass(frozen=True)
class AuxNet:
    """An evaluation network: ``recipe`` (what determines it; its cache key) and ``build()``."""
    recipe: dict
    build: Callable[[], PyTree]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task, ready to train (see the module docstring).

    metric: the headline metric key of ``evaluator('valid', aux)``'s output (lower is better);
    evaluator(split, aux) -> evaluate(variables) -> {metric: float} for split 'valid' | 'test';
    sample(variables, rng): text samples (list[str]) or images uint8 [n, H, W, C] per
    ``sample_kind``; recipe: what determines the pre-trained backbone (its cache key);
    init_backbone(rng) -> params; backbone_shapes() -> ShapeDtypeStructs (no compute);
    info: sizes for the run log; labels [M]: per-pool-example label or topic (-1 if none).
    """
    name: str
    metric: str
    loss_fn: Callable
    pool: dict
    client_train: list
    client_test: list
    public: dict
    valid: dict
    test: Optional[dict]
    labels: np.ndarray
    recipe: dict
    info: dict
    init_backbone: Callable
    backbone_shapes: Callable
    evaluator: Callable
    sample: Callable
    sample_kind: str
    client_metric: tuple[str, Callable]
    classes: Optional[tuple] = None
    aux_nets: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.sample_kind not in SAMPLE_KINDS:
            raise ValueError(f'task sample_kind must be one of {SAMPLE_KINDS}, got '
                             f'{self.sample_kind!r}')


def get(name: str):
    """The task module called ``name`` (config field ``task``)."""
    if name not in TASKS:
        raise ValueError(f'task must be one of {list(TASKS)}, got {name!r}')
    return importlib.import_module(f'fedgen.tasks.{name}')


def validate_split(s, partitions: tuple[str, ...], units: tuple[str, ...] = ('window', )) -> None:
    """One-line ValueErrors for the public/partition/federation fields every task reads
    (``s`` is a task's Settings with sections data and fed; ``units``: the local test units the
    task can split by)."""
    d, f = s.data, s.fed
    unit = getattr(d.partition, 'local_test_unit', 'window')
    if unit not in units:
        raise ValueError(f'data.partition.local_test_unit must be one of {units} for this task, '
                         f'got {unit!r}')
    if not 0.0 < d.public_fraction < 1.0:
        raise ValueError(f'data.public_fraction must be in (0, 1), got {d.public_fraction}')
    if d.partition.kind not in partitions:
        raise ValueError(f'data.partition.kind must be one of {partitions}, got '
                         f'{d.partition.kind!r}')
    if not d.partition.alpha > 0:
        raise ValueError(f'data.partition.alpha must be > 0, got {d.partition.alpha}')
    if not (isinstance(f.num_clients, int) and f.num_clients >= 1):
        raise ValueError(f'fed.num_clients must be an int >= 1, got {f.num_clients!r}')
    if not 1 <= f.clients_per_round <= f.num_clients:
        raise ValueError(f'fed.clients_per_round must be in [1, fed.num_clients={f.num_clients}]'
                         f', got {f.clients_per_round}')


def client_sizes(client_train) -> dict:
    """Min / median / max local train size, for the run log."""
    sizes = np.array([len(i) for i in client_train])
    return {
        'client_train_min': int(sizes.min()),
        'client_train_median': float(np.median(sizes)),
        'client_train_max': int(sizes.max())
    }
