"""A run's typed, frozen specification: what every command reads instead of the config.

    spec = translate.spec(config)   # once, at the entry point; validated as a whole
    spec.method                     # MethodParams: method, optimizers, LoRA, the one Aggregator
    spec.schedule.rounds            # T; spec.clients, spec.privacy, spec.settings (the task's)
    spec.sample_round(t)            # (ids [C_pad], present [C_pad] or None): f(seed, t)

The entry point (train, sweep, personalize, export, grid, reproduce, the Flower apps) turns its
``ConfigDict`` into a RunSpec with ``experiments.translate.spec`` and hands it down; nothing below
the entry reads the config again. ``record`` is the config as JSON: the run's identity, written to
config.json and compared on resume, never parsed for settings.
"""
import dataclasses
import json
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from fedgen import algorithms, tasks
from fedgen.algorithms import MethodParams
from fedgen.data import batching
from fedgen.fl import algorithm as base
from fedgen.fl import comm
from fedgen.fl import mesh as population
from fedgen.lora import bytes as lora_bytes
from fedgen.privacy import accounting
from fedgen.privacy import sampling as dp_sampling
from fedgen.privacy import secagg


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The loop: T rounds, an evaluation every ``eval_every`` rounds and at T (with samples when
    ``samples_every_eval``), the frozen backbone on test too (``zero_shot_test``), ``keep``
    checkpoints, and whether a workdir of another config is cleared (``overwrite``)."""
    rounds: int
    eval_every: int
    samples_every_eval: bool = False
    zero_shot_test: bool = False
    keep: int = 2
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class Clients:
    """The population and a round's draw: N clients, C per round, ``sampled`` = ceil(C (1 +
    over_select)) drawn, ``capacity`` padded rows of the client axis (= ``sampled`` unless
    Poisson sampling pads), sampling rate q = sampled / N; B, local epochs E and the step cap;
    clients per map (``chunk``, or the largest that fits ``mem_budget_mb`` > 0) and devices."""
    num_clients: int
    per_round: int
    sampled: int
    capacity: int
    poisson: bool
    rate: float
    batch_size: int
    local_epochs: int
    max_steps_per_epoch: int
    chunk: int
    mem_budget_mb: float
    num_devices: int


@dataclasses.dataclass(frozen=True)
class Privacy:
    """DP-FedAvg (``enabled`` when the clip norm S > 0): noise multiplier z, delta, the
    accountant's kind and the sampling it assumes; SecAgg's quantization (``secagg``: bits and
    scale, or None); ``notes``: what the settings mean, one line each, for the log."""
    enabled: bool = False
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0
    accountant: str = 'rdp'
    sampling: str = 'poisson'
    secagg: tuple[int, float] | None = None
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Personalize:
    """Local fine-tuning after training: E_p epochs with ``opt`` at ``lr``, at most ``max_steps``
    steps per client (0 = no cap)."""
    epochs: int
    opt: str
    lr: float
    max_steps: int = 0


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run (module docstring). ``settings``: the task's typed Settings (its pretrain section
    is the backbone recipe); ``method``: MethodParams with the chunk of the config (setup may
    choose another from the memory budget); ``ema_decay``: the server EMA in [0, 1);
    ``lora_aggregation`` and ``residual_rank``: what the LoRA rule sends each client;
    ``cache_dir``: where evaluation networks are cached ('' = the workdir); ``inception_path``:
    the Inception-v3 weights for FID ('' = none); ``init_from``: a PEFT adapter
    directory the adapters start from ('' = none)."""
    task: str
    seed: int
    settings: Any
    method: MethodParams
    ema_decay: float
    schedule: Schedule
    clients: Clients
    privacy: Privacy
    personalize: Personalize | None
    lora_aggregation: str = 'avg_ab'
    residual_rank: int = 0
    cache_dir: str = ''
    inception_path: str = ''
    init_from: str = ''
    record: str = '{}'

    def prepare_task(self):
        """The task, its data loaded and split, ready to train (fedgen.tasks.<task>.prepare)."""
        return tasks.get(self.task).prepare(self.settings)

    def with_backbone(self, path: str) -> 'RunSpec':
        """This run with pretrain.backbone_path = ``path`` (in its settings and its record)."""
        record = json.loads(self.record)
        record['pretrain']['backbone_path'] = path
        pre = dataclasses.replace(self.settings.pretrain, backbone_path=path)
        return dataclasses.replace(self,
                                   settings=dataclasses.replace(self.settings, pretrain=pre),
                                   record=json.dumps(record))

    def mesh(self) -> Mesh | None:
        """The client mesh of fed.num_devices (0 = every device; None for one device)."""
        return population.mesh_for(self.clients.num_devices, section='fed.')

    def sample_round(self, rnd: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(client ids [C_pad], present [C_pad] or None): round ``rnd``'s sampled clients, a pure
        function of (seed, round). Poisson sampling (DP) pads to the capacity; padding slots are
        marked absent and carry no data (batching.drop_absent)."""
        c = self.clients
        if c.poisson:
            return dp_sampling.poisson_clients(self.seed,
                                               rnd,
                                               c.num_clients,
                                               c.rate,
                                               c.capacity,
                                               section='fed.')
        return batching.sample_clients(self.seed, rnd, c.num_clients, c.sampled,
                                       section='fed.'), None

    def accountant(self) -> accounting.RoundAccountant | None:
        """A fresh privacy accountant (epsilon after t rounds at delta), or None without DP or
        with z = 0 (clipping only: no epsilon to report)."""
        p = self.privacy
        if not p.enabled or p.noise_multiplier == 0:
            return None
        return accounting.RoundAccountant(self.clients.rate,
                                          p.noise_multiplier,
                                          p.delta,
                                          p.accountant,
                                          p.sampling,
                                          self.clients.num_clients,
                                          section='fed.')

    def make_algorithm(self, loss_fn, chunk: int | None = None, mesh=None):
        """(MethodParams, Algorithm): the method with its aggregator and, with ema_decay > 0, the
        server EMA (``chunk`` overrides the spec's)."""
        p = self.method if chunk is None else dataclasses.replace(self.method, chunk=chunk)
        return p, base.with_ema(algorithms.make(p, loss_fn, mesh), self.ema_decay, section='fed.')

    def preflight(self, backbone_shapes) -> None:
        """Checks the LoRA targets/rank on the backbone's abstract shapes and, with SecAgg, that
        the quantization range S' = S - 1.5 sqrt(D) / s stays > 0 (no compute)."""
        _, trainable = jax.eval_shape(lambda b, r: algorithms.variables(self.method, b, r),
                                      backbone_shapes, jax.random.PRNGKey(0))
        if self.privacy.enabled and self.privacy.secagg is not None:
            upload = jax.eval_shape(self.make_algorithm(shapes_only_loss)[1].upload, trainable)
            bits, scale = self.privacy.secagg
            secagg.make_params(self.privacy.clip_norm,
                               self.clients.capacity,
                               bits,
                               scale,
                               num_params=comm.num_params(upload),
                               section='fed.')

    def client_bytes(self, alg, trainable: dict) -> tuple:
        """(up, down) bytes per client: plain ints, or [N] arrays when clients differ (true
        ranks r_k) or the protocol adds to them (the frozen delta of FedEx-LoRA / FLoRA,
        SecAgg's masked, quantized vector)."""
        cost = comm.round_cost(alg, trainable, 1)
        up, down = cost.up_per_client, cost.down_per_client
        ranks, method = self.method.client_ranks, self.lora_aggregation
        if 'lora' in trainable and (ranks is not None or method != 'avg_ab'):
            n = self.clients.num_clients
            r = np.asarray(ranks if ranks is not None else [self.method.lora.rank] * n)
            up = lora_bytes.upload_bytes(method, trainable['lora'], r)
            down = lora_bytes.download_bytes(method,
                                             trainable['lora'],
                                             r,
                                             residual_rank=self.residual_rank,
                                             round_clients=self.clients.per_round)['total']
        if self.privacy.enabled and self.privacy.secagg is not None:
            up = secagg.protocol_bytes(comm.num_params(alg.upload(trainable)),
                                       self.clients.capacity, self.privacy.secagg[0])['total']
        return up, down


def shapes_only_loss(variables, batch, key):
    """The loss of an algorithm built only to check its pairings and shapes: closed over by the
    algorithm, never traced."""
    raise RuntimeError('the algorithm is built for its shapes only')
