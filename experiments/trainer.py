"""The one round loop: R >= 1 federated runs, and everything they write.

    summaries, times = trainer.train(members, mesh=None, stop_after=None, samples=True, hooks=())

experiments.train is R = 1; experiments.sweep is R runs of one group. R = 1 runs the jitted
``apply(state, frozen, data)`` (its client axis sharded over ``mesh`` when the run has one);
R > 1 stacks the runs on a leading run axis and runs ``vmap(apply, in_axes=(0, None, 0))``
(fedgen/fl/runs.py): states [R, ...], data [R, C, S, ...], the frozen backbone passed once (no
mesh). Run r's numbers equal its R = 1 run's up to float32 reassociation of batched matmuls.

One round t (1-based): every run's RoundData (prepare.round_data, then the run's traced fields,
``Member.replace``) -> one jitted apply -> host copies -> per run r still going: its row
(rows.round_row; a non-finite state ends run r, unsaved, and the others go on), bytes
(comm.round_bytes), epsilon (its accountant), evaluation every eval.every rounds and at the last
(plus samples with eval.samples_every_eval), the metric hooks, round_s (the shared compute plus
r's own evaluation) -> metrics.jsonl and events (writers.RunWriter) -> r's checkpoint of step t.
A row is written before its checkpoint, so a kill at any moment resumes into exactly the rows and
byte totals of an unbroken run (writers.py).

Metric hooks: ``hook(spec, t, state, row) -> dict`` with run r's RunSpec, its host state after
round t and its row so far; the returned keys join the row. Client drift and the LoRA
aggregation error are in-graph hooks of the aggregators (fed.log_client_drift; the LoRA rules'
diagnostics) and reach the row through the round's metrics.

Resume: every run restores its newest good step s_r and all continue from s = min_r s_r; a run
ahead restores step s and drops its later steps (recomputed identically); a run that no longer
holds step s makes every run start again from round 0.

At the end, each run's summary.json: algorithm, rounds, backbone_* and final_* metrics (valid,
test, EMA), byte costs and totals, local steps, client chunk, epsilon and delta, ``Member.extra``
wall_s and phases_s (this session's wall seconds by phase: host packing, compile + first round,
client compute + aggregation (one program), evaluation, rows, bytes and events, checkpointing,
final evaluation); a run that failed has ``{'error': message}`` instead.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax

from experiments import backbones, prepare, rows, writers
from experiments.console import log, progress
from experiments.runspec import RunSpec
from fedgen import algorithms
from fedgen.fl import comm
from fedgen.fl import mesh as population
from fedgen.fl import runs as fsweep
from fedgen.io import checkpoint
from fedgen.models import layers

Hook = Callable[[RunSpec, int, Any, dict], dict]


@dataclasses.dataclass
class Member:
    """One run: its RunSpec, prepare.setup's dict, the directory it writes (``dir``), where its
    caches live (``cache``: backbone/ and evaluation networks), the RoundData fields it traces
    (``replace``: hparams, rates) and keys added to its summary (``extra``). ``error`` is set
    when it failed (it writes no more rows)."""
    spec: RunSpec
    setup: dict
    dir: str
    cache: str
    replace: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    error: str | None = None

    def open(self, start: int, primary: bool) -> None:
        """Writer from round ``start``, config.json, evaluator and backbone metrics, bytes."""
        c, task = self.spec, self.setup['task']
        self.phases = {}  # wall seconds per phase of this session (summary's phases_s)
        self.writer = writers.RunWriter(self.dir, start, primary)
        if [row['round'] for row in self.writer.rows] != list(range(1, start + 1)):
            log(f'warning: metrics.jsonl does not hold one row for each of rounds 1..{start}; '
                'its byte totals count only the rounds it holds')
        self.writer.config(c.record)
        log(f'data: {json.dumps(task.info)}')
        if primary:
            rows.describe_clients(task, self.dir)
        self.aux = backbones.auxiliaries(c, task, self.cache)
        self.evaluate = task.evaluator('valid', self.aux)
        log('evaluating the frozen backbone (zero-shot)...')
        self.backbone = self.evaluate({'params': self.setup['params']})
        log(f'backbone: {rows.fmt(self.backbone)}  ({self.setup["bb_info"]})')
        self.up, self.down = c.client_bytes(self.setup['alg'], self.setup['state'].trainable)
        self.acct = c.accountant()
        last = self.writer.rows[-1] if self.writer.rows else {}
        self.totals = [last.get('up_bytes_total', 0), last.get('down_bytes_total', 0)]
        self.sample_key = jax.random.fold_in(self.setup['rng'], 3)

    def round(self, t: int, host, metrics: dict, ids, sampled, compute_s: float,
              hooks: Sequence[Hook], samples: bool) -> None:
        """Round t's row (module docstring), then the checkpoint of step t; or the failure."""
        c, t1 = self.spec, time.time()
        live = metrics.pop('live')
        try:
            row = rows.round_row(t, metrics, t - 1, host)
        except ValueError as e:
            self.error = str(e)
            return
        up, down = comm.round_bytes(self.up, self.down, ids, sampled, live)
        self.totals = [self.totals[0] + up, self.totals[1] + down]
        if self.acct is not None:
            row['dp_epsilon'] = self.acct.epsilon_after(t)
        row.update(up_bytes_round=up,
                   down_bytes_round=down,
                   up_bytes_total=self.totals[0],
                   down_bytes_total=self.totals[1])
        t_eval = time.time()
        if t % c.schedule.eval_every == 0 or t == c.schedule.rounds:
            variables, ema = rows.eval_variables(self.setup['alg'], host, self.setup['frozen'])
            row.update(rows.evaluate_both(self.evaluate, variables, ema))
            if samples and c.schedule.samples_every_eval and self.writer.primary:  # EMA's, if any
                rows.write_samples(self.setup['task'],
                                   self.setup['task'].sample(ema or variables, self.sample_key),
                                   self.writer, t, f'round{t:04d}')
        t_write = time.time()
        for hook in hooks:
            row.update(hook(c, t, host, dict(row)))
        row['round_s'] = round(compute_s + time.time() - t1, 3)
        self.writer.row(row)  # before the checkpoint: see the module docstring
        t_save = time.time()
        checkpoint.save(self.mngr, t, state=host)
        t_end = time.time()
        for phase, dt in (('evaluation', t_write - t_eval), ('rows, bytes and events',
                                                             t_eval - t1 + t_save - t_write),
                          ('checkpointing', t_end - t_save)):
            _add(self.phases, phase, dt)

    def postfix(self) -> dict:
        """The progress bar's loss, latest metric (with PTB's window/stride), uplink and eps."""
        metric, done = self.setup['task'].metric, self.writer.rows
        seen = [x for x in done if x.get(metric) is not None]
        win = metric.rsplit('_', 1)[0]  # 'valid': its _window / _stride, when it has them
        proto = (f' W{seen[-1][win + "_window"]}/S{seen[-1][win + "_stride"]}'
                 if seen and win + '_window' in seen[-1] else '')
        loss = done[-1].get('train_loss') if done else None  # absent under DP
        out = {
            'loss': '-' if loss is None else f'{loss:.3f}',
            metric: f'{seen[-1][metric]:.2f}{proto}' if seen else '-',
            'up_MB': f'{self.totals[0] / 1e6:.2f}'
        }
        if self.acct is not None and done:  # the row holds null for an infinite epsilon
            out['eps'] = f'{self.acct.epsilon_after(done[-1]["round"]):.3g}'
        return out

    def finish(self, host, costs: dict, t_start: float, samples: bool) -> dict:
        """summary.json (module docstring) from the final state ``host``; the last round's
        evaluation is reused, the test split evaluated here."""
        if self.error is not None:
            return {'error': self.error}
        c, task, alg, frozen = (self.spec, self.setup['task'], self.setup['alg'],
                                self.setup['frozen'])
        t_final = time.time()
        variables, ema = rows.eval_variables(alg, host, frozen)
        bb, last = dict(self.backbone), self.writer.rows[-1] if self.writer.rows else {}
        final = {k: v for k, v in last.items() if k.removesuffix('_ema') in bb}
        if len(final) != len(bb) * (1 if ema is None else 2):
            final = rows.evaluate_both(self.evaluate, variables, ema)
        if task.test is not None:
            evaluate_test = task.evaluator('test', self.aux)
            final.update(rows.evaluate_both(evaluate_test, variables, ema))
            if c.schedule.zero_shot_test:  # the frozen backbone on test, too
                bb.update(evaluate_test({'params': self.setup['params']}))
        summary = {'algorithm': c.method.name, 'rounds': c.schedule.rounds}
        summary.update({f'backbone_{k}': v for k, v in bb.items()})
        summary.update({f'final_{k}': v for k, v in final.items()})
        summary.update(costs)
        summary.update(up_bytes_total=self.totals[0],
                       down_bytes_total=self.totals[1],
                       local_steps=self.setup['steps'],
                       client_chunk=self.setup['method'].chunk)
        if self.acct is not None:
            summary.update(dp_epsilon=last.get('dp_epsilon'), dp_delta=c.privacy.delta)
        summary.update(self.extra)
        _add(self.phases, 'final evaluation', time.time() - t_final)
        summary['phases_s'] = {k: round(v, 2) for k, v in self.phases.items()}
        log('wall time by phase: ' + ', '.join(f'{k} {v:.1f} s' for k, v in self.phases.items()))
        summary = self.writer.summary({**summary, 'wall_s': round(time.time() - t_start, 1)})
        if samples and self.writer.primary:
            rows.write_samples(task, task.sample(ema or variables, self.sample_key), self.writer,
                               c.schedule.rounds, 'final')
        return summary


def _add(phases: dict, name: str, seconds: float) -> None:
    phases[name] = phases.get(name, 0.0) + seconds


def costs(member: Member) -> dict:
    """The summary's byte costs, shared by a group's runs (same shapes), logged once."""
    r, spec = member.setup, member.spec
    cost = comm.round_cost(r['alg'], r['state'].trainable, spec.clients.per_round)
    full = comm.num_bytes(r['params'])
    # The LoRA adapters this config's lora.* would train (also for full-model methods: the
    # uplink comparison is against them).
    as_lora = dataclasses.replace(r['method'], name='fedgen_edge', prox_target='lora')
    adapters = comm.num_bytes(
        jax.eval_shape(lambda p: algorithms.variables(as_lora, p, jax.random.PRNGKey(0))[1],
                       r['params']))
    log(f'per client per round: up {cost.up_per_client:,} B, down {cost.down_per_client:,} B '
        f'({spec.method.name}); LoRA adapters {adapters:,} B = {100 * adapters / full:.3f}% of the '
        f'full model {full:,} B; local steps S={r["steps"]}')
    return {
        'up_bytes_per_client_round': cost.up_per_client,
        'down_bytes_per_client_round': cost.down_per_client,
        'up_bytes_per_round': cost.up_round,
        'lora_share_of_full_uplink': adapters / full
    }


def restore(members: list[Member], primary: bool) -> tuple[int, list]:
    """(s, host states at step s): the resume point of every run (module docstring)."""
    starts, states = [], []
    for m in members:
        m.mngr = checkpoint.manager(m.dir, m.spec.schedule.keep)
        init = jax.device_get(m.setup['state'])
        step, items, warnings = checkpoint.restore_latest(m.mngr, state=init)
        for w in warnings:
            log(f'warning: {w}')
        starts.append(step or 0)
        states.append(items['state'] if step else init)
    start = min(starts)
    if start and any(start not in m.mngr.all_steps() for m in members):
        start = 0
    for i, m in enumerate(members):
        if starts[i] == start:
            continue
        init = jax.device_get(m.setup['state'])
        states[i] = checkpoint.restore(m.mngr, start, state=init)['state'] if start else init
        if primary:  # the later steps are recomputed; Orbax saves no step below its latest
            for step in m.mngr.all_steps():
                if step > start:
                    shutil.rmtree(os.path.join(str(m.mngr.directory), str(step)))
        m.mngr.reload()
        log(f'{m.dir}: resumes from round {start} with the other runs (it held {starts[i]})')
    return start, states


def _one(tree, n: int, i: int):
    """Run i's slice of a round's output: the tree itself at R = 1, else its [i] on the run axis."""
    return tree if n == 1 else fsweep.take(tree, i)


def _place(state, frozen, mesh) -> tuple:
    """The state and frozen tree on the devices, once; the evaluator runs on host copies.
    Without a mesh both are committed to one device: a round's output state is committed, so an
    uncommitted first input would compile the round a second time in round 2."""
    if mesh is not None:
        return population.replicate(state, mesh), population.replicate(frozen, mesh)
    return jax.device_put((state, frozen), jax.local_devices()[0])


def train(members: list[Member],
          *,
          mesh=None,
          stop_after: int | None = None,
          samples: bool = True,
          hooks: Sequence[Hook] = (),
          t_start: float | None = None) -> tuple[list[dict], list[float]]:
    """Runs (or resumes) ``members`` together to their rounds T (or ``stop_after`` rounds, as a kill
    between rounds would: each summary is then ``{'stopped_after': n}``). Returns (one summary
    per member, the compute seconds of each round). The runs share T, the algorithm's
    compiled round (member 0's) and the frozen backbone; ``mesh`` needs R = 1."""
    t_start = time.time() if t_start is None else t_start
    n, m0, primary = len(members), members[0], population.is_primary()
    c0, alg, frozen = m0.spec, m0.setup['alg'], m0.setup['frozen']
    if n > 1 and mesh is not None:
        raise ValueError('runs stacked on a run axis run on one device (fed.num_devices=1)')
    start, states = restore(members, primary)
    if start:
        log(f'resumed from round {start}')
    try:
        for m in members:
            m.open(start, primary)
        state, frozen_dev = _place(states[0] if n == 1 else fsweep.stack(states), frozen, mesh)
        per_round = c0.clients.capacity  # C, ceil(C (1 + over_select)) or the DP capacity
        width = per_round + (-per_round) % (mesh.size if mesh else 1)
        span = population.process_rows(mesh, width)
        steps = max(m.setup['steps'] for m in members)
        log(f'client axis: {width} rows over {mesh.size if mesh else 1} device(s) in '
            f'{jax.process_count()} process(es); this process packs rows {span[0]}..{span[1] - 1}' +
            (f'; {n} runs vmapped' if n > 1 else ''))
        shared = costs(m0)
        for note in c0.privacy.notes:
            log(note)
        dtype = getattr(getattr(c0.settings, 'model', None), 'dtype', 'float32')
        apply = jax.jit(alg.apply if n == 1 else fsweep.vmap_round(alg.apply),
                        donate_argnums=0,
                        compiler_options=layers.compiler_options(dtype))
        rounds = c0.schedule.rounds
        end = rounds if stop_after is None else min(rounds, stop_after)
        times, host, phases = [], population.to_host(state), {}
        bar = progress(range(start, end),
                       total=rounds,
                       desc='rounds',
                       unit='round',
                       initial=start,
                       disable=not primary)
        try:
            for rnd in bar:
                t0 = time.time()
                data = [
                    prepare.round_data(m.spec, m.setup['task'], steps, rnd, mesh, span,
                                       width).replace(**m.replace) for m in members
                ]
                data = data[0] if n == 1 else fsweep.stack(data)
                t_pack = time.time()
                if rnd == start:
                    log('compiling the round (first call)...')
                state, out = apply(state, frozen_dev, data)
                host, out, ids, n_k = population.to_host((state, out, data.client_ids, data.n_k))
                times.append(time.time() - t0)
                _add(phases, 'host packing', t_pack - t0)
                _add(
                    phases, 'compile + first round'
                    if rnd == start else 'client compute + aggregation (one program)',
                    time.time() - t_pack)
                for i, m in enumerate(members):
                    if m.error is None:
                        m.round(rnd + 1, _one(host, n, i), _one(out, n, i), _one(ids, n, i),
                                _one(n_k, n, i) > 0, times[-1], hooks, samples)
                        if m.error is not None and n > 1:
                            log(f'{os.path.basename(m.dir)}: {m.error}; this run stops')
                going = [m for m in members if m.error is None]
                if not going:
                    break
                bar.set_postfix({**going[0].postfix(), **({'runs': len(going)} if n > 1 else {})})
        finally:
            bar.close()
            for m in members:  # the last good step is committed even when a round failed
                checkpoint.wait(m.mngr)
        if end < rounds:
            return [{
                'error': m.error
            } if m.error else {
                'stopped_after': end
            } for m in members], times
        for m in members:
            m.phases.update(phases)
        return [
            m.finish(_one(host, n, i), shared, t_start, samples) for i, m in enumerate(members)
        ], times
    finally:
        for m in members:
            if hasattr(m, 'writer'):
                m.writer.close()
