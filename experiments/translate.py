"""The one place where a run's ml_collections config becomes typed hyper-parameters.

    spec = translate.spec(config)    # experiments.runspec.RunSpec, frozen, validated as a whole

Library code never reads a ConfigDict; every entry point (train, sweep, personalize, export, grid,
reproduce, the Flower apps) calls :func:`spec` once and hands the RunSpec down. The helpers below
are this translation's parts; only :func:`spec` and :func:`build` are used outside.
"""
import dataclasses
import typing

from experiments import runspec
from fedgen import aggregators, algorithms, tasks
from fedgen.fl import algorithm as base
from fedgen.fl import attacks
from fedgen.fl import engine
from fedgen.fl import fates
from fedgen.aggregators import lora_math as lora_aggregation
from fedgen.lora import ranks as lora_ranks
from fedgen.aggregators import robust
from fedgen.privacy import accounting
from fedgen.privacy import dp as dp_lib
from fedgen.privacy import sampling as dp_sampling
from fedgen.privacy import secagg
from fedgen.algorithms import optim


def build(cls, section, path: str = ''):
    """An instance of the frozen dataclass ``cls`` from a config section (a mapping).

    Fields that are dataclasses are built recursively from the sub-section of the same name;
    lists become tuples. The dataclass names what it reads: extra config fields are other
    components' (the config itself is locked, so a typo fails there); a missing field is a
    one-line ValueError."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f'{path}{f.name}'
        if f.name not in section:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f'config has no field {name} (needed by {cls.__qualname__})')
            continue
        value = section[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = build(hints[f.name], value, f'{name}.')
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def spec(config) -> runspec.RunSpec:
    """The run's RunSpec from its config: every field and every pairing of fields checked (one
    line naming the field(s) on the first that fails), before any data is read."""
    _check_int_fields(config)
    fed, d = config.fed, config.fed.dp
    settings = build(tasks.get(config.task).Settings, config.to_dict())
    settings.pretrain.check(section='pretrain.')
    method = _method_params(config)
    ema = _fed_ema_decay(config)
    dp = _dp_enabled(config)
    privacy = runspec.Privacy()
    if dp:
        privacy = runspec.Privacy(enabled=True,
                                  clip_norm=float(d.clip_norm),
                                  noise_multiplier=_noise_multiplier(config),
                                  delta=_dp_delta(config),
                                  accountant=d.accountant,
                                  sampling=d.sampling,
                                  secagg=(int(fed.secagg.bits),
                                          float(fed.secagg.scale)) if fed.secagg.enabled else None,
                                  notes=tuple(_privacy_notes(config)))
    clients = runspec.Clients(num_clients=fed.num_clients,
                              per_round=fed.clients_per_round,
                              sampled=_round_clients(config),
                              capacity=_dp_capacity(config),
                              poisson=dp and d.sampling == 'poisson',
                              rate=_sampling_rate(config),
                              batch_size=fed.batch_size,
                              local_epochs=fed.local_epochs,
                              max_steps_per_epoch=fed.max_steps_per_epoch,
                              chunk=fed.client_chunk,
                              mem_budget_mb=fed.client_mem_budget_mb,
                              num_devices=fed.num_devices)
    ev = config.eval
    schedule = runspec.Schedule(rounds=fed.rounds,
                                eval_every=ev.every,
                                samples_every_eval=bool(ev.get('samples_every_eval', False)),
                                zero_shot_test=bool(ev.get('zero_shot_test', False)),
                                keep=int(config.checkpoint.keep),
                                overwrite=bool(config.checkpoint.overwrite))
    pc = config.get('personalize')
    personal = None if pc is None else runspec.Personalize(int(pc.epochs), pc.opt, float(pc.lr),
                                                           int(pc.get('max_steps', 0)))
    metrics = config.get('metrics') or {}
    out = runspec.RunSpec(task=config.task,
                          seed=config.seed,
                          settings=settings,
                          method=method,
                          ema_decay=ema,
                          schedule=schedule,
                          clients=clients,
                          privacy=privacy,
                          personalize=personal,
                          lora_aggregation=fed.lora_aggregation,
                          residual_rank=fed.residual_rank,
                          cache_dir=str(metrics.get('cache_dir', '') or ''),
                          inception_path=str(metrics.get('inception_path', '') or ''),
                          init_from=str(config.lora.get('init_from', '') or ''),
                          record=config.to_json_best_effort())
    out.make_algorithm(runspec.shapes_only_loss)  # method x aggregator x EMA (no compute)
    return out


def _lora_spec(config) -> algorithms.LoraSpec:
    lo = config.lora
    targets = (lo.targets, ) if isinstance(lo.targets, str) else tuple(lo.targets)
    return algorithms.LoraSpec(rank=lo.rank, alpha=float(lo.alpha), targets=targets)


def _faults(config) -> engine.Faults:
    """Simulated dropouts, stragglers and attackers from ``config.fed``."""
    fed = config.fed
    fates.check_rates(fed.dropout_rate,
                      fed.straggler_rate,
                      fed.straggler_min_frac,
                      fed.over_select,
                      section='fed.')
    a = fed.attack
    attacks.check(a.kind, a.fraction, a.scale, a.noise_norm, section='fed.')
    return engine.Faults(dropout=float(fed.dropout_rate),
                         straggler=float(fed.straggler_rate),
                         straggler_min_frac=float(fed.straggler_min_frac),
                         attack=a.kind,
                         attack_fraction=float(a.fraction),
                         attack_scale=float(a.scale),
                         attack_noise_norm=float(a.noise_norm),
                         attack_seed=config.seed)


def _round_clients(config) -> int:
    """Clients sampled per round: ceil(C (1 + fed.over_select)), so that about C report."""
    return fates.over_select(config.fed.clients_per_round, config.fed.over_select)


def _dp_enabled(config) -> bool:
    """DP-FedAvg is on when fed.dp.clip_norm > 0."""
    return config.fed.dp.clip_norm != 0


def _dp_delta(config) -> float:
    """fed.dp.delta, or N^-1.1 when it is 0 (well below 1/N: a mechanism that publishes one random
    user's data is (0, 1/N)-DP, so delta >= 1/N is refused)."""
    return config.fed.dp.delta or accounting.default_delta(config.fed.num_clients, section='fed.')


def _sampling_rate(config) -> float:
    """q = C / N, the expected share of clients in a round."""
    return _round_clients(config) / config.fed.num_clients


def _dp_capacity(config) -> int:
    """Padded clients per round: C for fixed-size sampling; for Poisson sampling the smallest c
    with T * P(Binomial(N, q) > c) <= 1e-6."""
    d, fed = config.fed.dp, config.fed
    if not _dp_enabled(config) or d.sampling == 'fixed':
        return _round_clients(config)
    return dp_sampling.poisson_capacity(fed.num_clients,
                                        _sampling_rate(config),
                                        fed.rounds,
                                        section='fed.')


def _noise_multiplier(config) -> float:
    """z: fed.dp.noise_multiplier, or calibrated to fed.dp.target_epsilon over fed.rounds."""
    d, fed = config.fed.dp, config.fed
    if not d.target_epsilon:
        return float(d.noise_multiplier)
    return accounting.calibrate_noise(d.target_epsilon,
                                      _sampling_rate(config),
                                      fed.rounds,
                                      _dp_delta(config),
                                      d.accountant,
                                      d.sampling,
                                      fed.num_clients,
                                      section='fed.')


def _dp_params(config):
    """(DPParams, SecAggParams or None) of the run; validated before any compute."""
    d, fed = config.fed.dp, config.fed
    if not (isinstance(d.clip_norm, (int, float)) and d.clip_norm > 0):
        raise ValueError(f'fed.dp.clip_norm must be > 0 (0 = DP off), got {d.clip_norm!r}')
    if d.target_epsilon and d.noise_multiplier:
        raise ValueError('fed.dp.noise_multiplier cannot run with fed.dp.target_epsilon: the '
                         'target calibrates the noise multiplier; set one of them (the other 0)')
    delta = _dp_delta(config)
    accounting.check(delta,
                     d.accountant,
                     d.sampling,
                     _sampling_rate(config),
                     fed.num_clients,
                     section='fed.')
    params = dp_lib.make_params(d.clip_norm,
                                _noise_multiplier(config),
                                _round_clients(config),
                                d.adaptive,
                                d.target_quantile,
                                d.clip_lr,
                                d.count_stddev,
                                section='fed.')
    sec = None
    if fed.secagg.enabled:
        sec = secagg.make_params(d.clip_norm,
                                 _dp_capacity(config),
                                 fed.secagg.bits,
                                 fed.secagg.scale,
                                 simulate_masks=fed.secagg.simulate_masks,
                                 section='fed.')
    return params, sec


def _base_aggregator(config) -> aggregators.Aggregator:
    """The reduction before any LoRA wrapper: DP-FedAvg (+ SecAgg) when fed.dp.clip_norm > 0,
    else ``fed.aggregator`` with ``fed.robust.*``."""
    fed = config.fed
    name, hp = fed.aggregator, dict(fed.robust.to_dict())
    robust.check(name, _round_clients(config), fed.attack.fraction, section='fed.', **hp)
    reduction = f'fed.aggregator={name!r}'
    if fed.secagg.enabled and name != 'mean':
        aggregators.refuse('fed.secagg.enabled', reduction,
                           'the server never sees individual updates, only their masked sum')
    if fed.secagg.enabled and not _dp_enabled(config):
        aggregators.refuse('fed.secagg.enabled', 'fed.dp.clip_norm=0',
                           'the quantization range comes from the clip norm; set fed.dp.clip_norm')
    if _dp_enabled(config):
        if name != 'mean':
            aggregators.refuse(
                'fed.dp', reduction, 'DP-FedAvg is a clipped, noised mean; a '
                'robust reduction reads individual updates its noise does not cover')
        return aggregators.dp_mean(*_dp_params(config), label='fed.dp', secagg_label='fed.secagg')
    if name == 'mean':
        return aggregators.weighted_mean(drift=bool(fed.log_client_drift), label=reduction)
    if fed.log_client_drift:
        aggregators.refuse(
            'fed.log_client_drift', reduction, 'client drift is measured around '
            'the weighted mean the server applies; a robust reduction has none')
    return aggregators.robust_reduction(name, label=reduction, section='fed.', **hp)


def _aggregator(config) -> aggregators.Aggregator:
    """The run's one server Aggregator: the base reduction wrapped by heterogeneous ranks and the
    LoRA aggregation (fedgen.aggregators); refused combinations raise one line naming both."""
    fed = config.fed
    method = fed.lora_aggregation
    lora_aggregation.validate(method, fed.residual_rank, section='fed.')
    agg = _base_aggregator(config)
    ranks = _client_ranks(config)
    hetero = ranks is not None and len(set(ranks)) > 1
    if ranks is not None:
        agg = aggregators.hetlora(agg, 'lora.client_ranks')
    label = f'fed.lora_aggregation={method!r}'
    if method == 'ffa':
        agg = aggregators.ffa(agg, label)
    elif method != 'avg_ab':
        if method == 'exact_residual' and hetero:
            aggregators.refuse(
                label, 'lora.client_ranks', 'a rank-r_k client downloads a '
                'truncation of the global adapter, so the residual would not make '
                "its model the exact mean; use 'stack' or 'svd_refactor'")
        agg = aggregators.product(method,
                                  float(config.lora.alpha),
                                  fed.residual_rank,
                                  agg,
                                  label,
                                  section='fed.')
    adapters = fed.algorithm not in ('fedavg_full', 'fedsa', 'local_only',
                                     'centralized') and not (fed.algorithm == 'fedprox'
                                                             and fed.prox_target == 'full')
    if method == 'avg_ab' and adapters:
        agg = aggregators.with_error(agg)
    return agg


def _client_ranks(config) -> tuple | None:
    """Every client's LoRA rank from lora.client_ranks ('' = all lora.rank)."""
    spec = config.lora.client_ranks
    if spec in ('', None) or spec == ():
        return None
    if config.fed.num_clients < 1:
        raise ValueError(f'fed.num_clients must be >= 1, got {config.fed.num_clients}')
    ranks = lora_ranks.client_ranks(spec,
                                    config.fed.num_clients,
                                    config.lora.rank,
                                    config.seed,
                                    section='lora.')
    if all(int(r) == config.lora.rank for r in ranks):
        return None  # every client at lora.rank: no masks, the plain adapters
    return tuple(int(r) for r in ranks)


def _server_spec(config) -> optim.ServerOptSpec:
    fed = config.fed
    return optim.ServerOptSpec(fed.server_opt, fed.server_lr, fed.server_b1, fed.server_b2,
                               fed.server_tau)


# MethodParams attributes -> the config fields that set them (named in its error messages).
METHOD_FIELDS = (('name', 'fed.algorithm'), ('num_clients', 'fed.num_clients'),
                 ('chunk', 'fed.client_chunk'), ('prox_mu', 'fed.prox_mu'),
                 ('prox_target', 'fed.prox_target'), ('ditto_lambda', 'fed.ditto_lambda'),
                 ('server_opt', 'fed.server_opt'), ('server_lr', 'fed.server_lr'),
                 ('client_ranks', 'lora.client_ranks'), ('lora', 'lora'))


def _method_params(config) -> algorithms.MethodParams:
    """MethodParams from ``config.fed`` and ``config.lora``."""
    fed = config.fed
    server = _server_spec(config)
    return algorithms.MethodParams(name=fed.algorithm,
                                   num_clients=fed.num_clients,
                                   client_tx=optim.build(fed.client_opt, fed.client_lr,
                                                         'fed.client_opt', 'fed.client_lr'),
                                   server_tx=optim.build_server(server, 'fed.server'),
                                   lora=_lora_spec(config),
                                   chunk=fed.client_chunk,
                                   prox_mu=float(fed.prox_mu),
                                   prox_target=fed.prox_target,
                                   ditto_lambda=float(fed.ditto_lambda),
                                   aggregator=_aggregator(config),
                                   server_opt=server,
                                   faults=_faults(config),
                                   client_ranks=_client_ranks(config),
                                   log_diagnostics=bool(fed.dp.log_diagnostics),
                                   fields=METHOD_FIELDS)


def _fed_ema_decay(config) -> float:
    """fed.ema_decay, checked (a number in [0, 1))."""
    decay = config.fed.ema_decay
    base.check_ema_decay(decay, section='fed.')
    return float(decay)


# Integer fields the whole run reads, with their least allowed value (checked when present).
INT_FIELDS = (('fed.rounds', 0), ('eval.every', 1), ('eval.batch_size', 1), ('checkpoint.keep', 1),
              ('pretrain.steps', 0), ('personalize.epochs', 0), ('personalize.max_steps', 0))


def _check_int_fields(config) -> None:
    """One-line errors for the integer fields of the loop, evaluation, checkpoints, pre-training
    and personalization (before any compute); the library checks its own parameters again."""
    for path, least in INT_FIELDS:
        section, name = path.rsplit('.', 1)
        node = config
        for key in section.split('.'):
            node = node.get(key) if node is not None else None
        if node is None or name not in node:
            continue
        value = node[name]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise ValueError(f'{path} must be an int >= {least}, got {value!r}')


def _privacy_notes(config) -> list[str]:
    """What the run's privacy settings mean, one line each, for the start of the log."""
    fed = config.fed
    if not _dp_enabled(config):
        return []
    d = fed.dp
    z = _noise_multiplier(config)
    default = '' if d.delta else f' (default N^-1.1 for N={fed.num_clients})'
    notes = [
        f'DP-FedAvg: clip {d.clip_norm} (adaptive: {d.adaptive}), noise multiplier z={z:.4g}, '
        f'{d.sampling} sampling q={_sampling_rate(config):.4g}, delta={_dp_delta(config):.3g}'
        f'{default}, '
        f'{d.accountant} accountant; uniform client weights (n_k would break the sensitivity)',
        'trust: ' + ('SecAgg (pairwise masks, the server sees only the sum) plus central noise '
                     'added after unmasking: the server is trusted to add the noise'
                     if fed.secagg.enabled else 'central DP: the server sees every clipped '
                     'update and is trusted to add the noise')
    ]
    if not (fed.server_opt == 'sgd' and fed.server_lr == 1.0):
        notes.append(f'server optimizer {fed.server_opt} (lr {fed.server_lr}): the accounting '
                     'covers the noisy aggregate; the server step is post-processing')
    if fed.algorithm == 'ditto':
        notes.append('ditto: the personal models never leave the clients; only the global '
                     'updates are private')
    if fed.algorithm in ('fedavg_full', ) or (fed.algorithm == 'fedprox'
                                              and fed.prox_target == 'full'):
        notes.append('full-model updates are private too, but far larger: the same noise '
                     'std per coordinate over every weight')
    if z == 0:
        notes.append('noise multiplier 0: clipping only, no privacy guarantee (no epsilon)')
    if d.log_diagnostics:
        notes.append('fed.dp.log_diagnostics: train_loss, update norms, clipped fractions, client '
                     'counts and LoRA aggregation errors are statistics of raw client updates; '
                     'they fall OUTSIDE epsilon')
    else:
        notes.append('logged under DP: only what epsilon covers (the noised aggregate, the clip '
                     'norm, the noise std, evaluations of the noised model)')
    return notes
