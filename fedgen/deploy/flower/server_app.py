"""fedgen's ServerApp: the server's half of every round, with the clients on Flower SuperNodes.

Round t (0-based rounds done), as experiments.train runs it, with the client phase replaced by
the network:

    ids, present = translate.sample_round(config, t)    fedgen's sampling, a function of (seed, t)
    n_k          = the roster's example counts of ids (0 for Poisson padding)
    replies      = train messages with download(w_G^t) -> ClientOutput rows [1, ...] (exchange.py)
    out          = the rows stacked [C, ...] in the sampled order (a dropped client: report 0)
    state, m     = server_phase(state, RoundData(ids, n_k), out)   aggregator + server optimizer

then the same row (rounds, losses, counts, bytes; evaluation every eval.every rounds), the same
files (metrics.jsonl, TensorBoard events, Orbax checkpoint of step t+1, summary.json; the row is
written before its checkpoint) and the same resume: a killed server restarted on the same workdir
continues from the last checkpoint, with rows equal to an unbroken run's. Each row adds what only
a deployment has (``deploy_*``): the dropped ids, the bytes Flower put on the wire both ways, the
uploads' array bytes, the ids whose upload was used (``deploy_used_ids``), and the round's time
split into client setup, compile and compute, serialization, transport and runtime (the rest of
the round trip) and the server phase.

Per-client persistent rows (Ditto, FedSA, local-only) live on the clients' nodes (personal.py).
The server holds none: its ``state.clients`` is {} (and so are the replies' ``kept``), which
every method's server_phase maps to {} (the scatter-add over no leaves), so the checkpoints carry
no rows. What the server does keep is, per client, the last round whose upload it used, read back
from metrics.jsonl on resume; each train message tells the client that round.
"""
import json
import os
import time

import jax
import numpy as np
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from experiments import backbones, train, writers
from experiments import translate
from fedgen.io import checkpoint
from fedgen.fl import comm
from fedgen.data import batching
from fedgen.deploy.flower import client_app, exchange, personal, spec, wire

app = ServerApp()


def row_timings(trip: exchange.RoundTrip, server_s: float) -> dict:
    """The round's time split: per-client maxima of setup / compile / compute / serialization
    (and the sums of compute and setup over clients), the transport and runtime share (the round
    trip minus the slowest client's setup and its compile + compute + serialization), and the
    server phase."""
    m = trip.metrics
    worst = lambda k: round(max((x[k] for x in m), default=0.0), 4)
    total = lambda k: round(sum(x[k] for x in m), 4)
    inside = max((x['compile-s'] + x['compute-s'] + x['serialize-s'] for x in m), default=0.0)
    return {
        'deploy_client_setup_s': worst('setup-s'),
        'deploy_client_compile_s': worst('compile-s'),
        'deploy_client_compute_s': worst('compute-s'),
        'deploy_client_compute_sum_s': total('compute-s'),
        'deploy_client_setup_sum_s': total('setup-s'),
        'deploy_serialize_s': worst('serialize-s'),
        'deploy_transport_s': round(max(trip.wall_s - inside - worst('setup-s'), 0.0), 4),
        'deploy_roundtrip_s': round(trip.wall_s, 4),
        'deploy_server_s': round(server_s, 4)
    }


def summarize(writer, r, config, bb_metrics: dict, final: dict, cost, totals: dict, acct,
              t_start: float) -> dict:
    """summary.json with experiments.train's keys (the run's totals and final metrics)."""
    fed = config.fed
    full = comm.num_bytes(r['params'])
    return writer.summary({
        'algorithm':
        fed.algorithm,
        'rounds':
        fed.rounds,
        **{
            f'backbone_{k}': v
            for k, v in bb_metrics.items()
        },
        **{
            f'final_{k}': v
            for k, v in final.items()
        }, 'up_bytes_per_client_round':
        cost.up_per_client,
        'down_bytes_per_client_round':
        cost.down_per_client,
        'up_bytes_per_round':
        cost.up_round,
        'up_bytes_total':
        totals['up_bytes'],
        'down_bytes_total':
        totals['down_bytes'],
        'lora_share_of_full_uplink':
        comm.num_bytes(r['state'].trainable) / full,
        'local_steps':
        r['steps'],
        **({
            'dp_epsilon': writer.rows[-1].get('dp_epsilon'),
            'dp_delta': translate.dp_delta(config)
        } if acct is not None else {}), 'deployed':
        True,
        'wall_s':
        round(time.time() - t_start, 1)
    })


def run(grid: Grid, opts: spec.RunOptions) -> dict:
    """Runs (or resumes) the deployed job; returns the summary dict (module docstring)."""
    t_start = time.time()
    config, workdir, fed = opts.config, opts.workdir, opts.config.fed
    spec.check_config(config)
    os.makedirs(workdir, exist_ok=True)
    train.check_workdir(config, workdir)
    r = train.setup(config, workdir)
    task, alg, state, frozen = r['task'], r['alg'], r['state'], r['frozen']
    spec.check_algorithm(alg, state.trainable, fed.algorithm)
    one = client_app.one_client(config, task, r['steps'], 0, 0)
    template = client_app.outgoing(jax.eval_shape(alg.client_phase, state, frozen, one))
    state = state.replace(clients={})  # the rows live on the clients' nodes (module docstring)
    mngr = checkpoint.manager(workdir, config.checkpoint.keep)
    start, items, warnings = checkpoint.restore_latest(mngr, state=jax.device_get(state))
    for w in warnings:
        print(f'warning: {w}', flush=True)
    start = start or 0
    if start:
        state = items['state']
        print(f'resumed from round {start}', flush=True)
    writer = writers.RunWriter(workdir, start, True)
    writer.config(config.to_json_best_effort(indent=1))
    aux = backbones.auxiliaries(config, task, workdir)
    evaluate = task.evaluator('valid', aux)
    bb_metrics = evaluate({'params': r['params']})
    print(f'backbone: {train.fmt(bb_metrics)}  ({r["bb_info"]})', flush=True)
    cost = comm.round_cost(alg, r['state'].trainable, fed.clients_per_round)
    up_client, down_client = translate.client_bytes(config, alg, r['state'].trainable)
    acct = translate.accountant(config)
    roster = exchange.discover(grid, fed.num_clients, opts.connect_timeout)
    print(
        f'roster: {fed.num_clients} clients on {len(set(roster.node_of.values()))} '
        f'SuperNode(s); per client per round: up {cost.up_per_client:,} B, down '
        f'{cost.down_per_client:,} B; local steps S={r["steps"]}',
        flush=True)
    server_phase = jax.jit(alg.server_phase)
    state = jax.device_put(state)
    host = jax.device_get(state)
    last = writer.rows[-1] if writer.rows else {}
    last_used = personal.last_used(writer.rows)
    totals = {
        'up_bytes': last.get('up_bytes_total', 0),
        'down_bytes': last.get('down_bytes_total', 0)
    }
    try:
        for rnd in range(start, fed.rounds):
            t0 = time.time()
            exchange.refresh(grid, roster)
            ids, present = translate.sample_round(config, rnd)
            n_k = roster.n_k[ids] * (1.0 if present is None else np.asarray(present, np.float32))
            data = batching.RoundData(client_ids=ids.astype(np.int32),
                                      batches={},
                                      mask=np.zeros((len(ids), 0), np.float32),
                                      n_k=n_k.astype(np.float32))
            print(f'round {rnd + 1}/{fed.rounds}: training clients {[int(i) for i in ids]}',
                  flush=True)
            down = RecordDict({'down': wire.to_record(alg.download(host.trainable))})
            trip = exchange.run_round(grid, roster, rnd, ids, n_k > 0, down, template,
                                      opts.round_timeout, last_used)
            t1 = time.time()
            state, m = server_phase(state, data, exchange.stack_rows(trip.rows, template))
            host, m = jax.device_get((state, m))
            server_s = time.time() - t1
            live = m.pop('live')
            used = [int(i) for i, x in zip(ids, np.ravel(live)) if x > 0]
            row = train.round_row(rnd + 1, m, rnd, host)
            up, dn = comm.round_bytes(up_client, down_client, ids, n_k > 0, live)
            totals = {'up_bytes': totals['up_bytes'] + up, 'down_bytes': totals['down_bytes'] + dn}
            if acct is not None:
                row['dp_epsilon'] = acct.epsilon_after(rnd + 1)
            row.update({
                'up_bytes_round': up,
                'down_bytes_round': dn,
                'up_bytes_total': totals['up_bytes'],
                'down_bytes_total': totals['down_bytes']
            })
            if (rnd + 1) % config.eval.every == 0 or rnd + 1 == fed.rounds:
                variables, ema_vars = train.eval_variables(alg, host, frozen)
                row.update(train.evaluate_both(evaluate, variables, ema_vars))
            row['round_s'] = round(time.time() - t0, 3)
            row.update({
                'deploy_client_ids': [int(i) for i in ids],
                'deploy_dropped': trip.dropped,
                'deploy_used_ids': used,
                'deploy_wire_up_bytes': trip.wire_up,
                'deploy_wire_down_bytes': trip.wire_down,
                'deploy_payload_up_bytes': trip.payload_up,
                **row_timings(trip, server_s)
            })
            row = writer.row(row)
            checkpoint.save(mngr, rnd + 1, state=host)
            last_used.update({i: rnd for i in used})
            print(
                f'round {rnd + 1}/{fed.rounds}: clients {row["deploy_client_ids"]} dropped '
                f'{trip.dropped}  {train.fmt({k: v for k, v in row.items() if k in PROGRESS})}'
                f'  {row["round_s"]:.1f} s',
                flush=True)
    except BaseException:
        writer.close()
        raise
    finally:
        checkpoint.wait(mngr)
    variables, ema_vars = train.eval_variables(alg, host, frozen)
    final = {
        k: v
        for k, v in writer.rows[-1].items() if k.removesuffix('_ema') in bb_metrics
    } if writer.rows else {}
    if len(final) != len(bb_metrics) * (1 if ema_vars is None else 2):
        final = train.evaluate_both(evaluate, variables, ema_vars)
    if task.test is not None:
        evaluate_test = task.evaluator('test', aux)
        final.update(train.evaluate_both(evaluate_test, variables, ema_vars))
        if config.eval.get('zero_shot_test', False):  # the frozen backbone on test, too
            bb_metrics = {**bb_metrics, **evaluate_test({'params': r['params']})}
    summary = summarize(writer, r, config, bb_metrics, final, cost, totals, acct, t_start)
    print('summary: ' + json.dumps(summary), flush=True)
    writer.close()
    return summary


PROGRESS = ('train_loss', 'clients_used', 'valid_ppl', 'up_bytes_round', 'deploy_wire_up_bytes')


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: the run's options from its run config, then :func:`run`."""
    opts = spec.run_options(context.run_config)
    try:
        run(grid, opts)
    except ValueError as e:  # fedgen's one-line errors; the status file tells the launcher
        writers.write_atomic(os.path.join(opts.workdir, 'deploy_error.txt'), str(e))
        print(f'error: {e}', flush=True)
        raise
