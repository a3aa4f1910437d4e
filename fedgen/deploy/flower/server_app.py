"""fedgen's ServerApp: the server's half of every round, with the clients on Flower SuperNodes.

Round t (0-based rounds done), as experiments.train runs it, with the client phase replaced by
the network:

    ids, present = run.sample_round(t)                  fedgen's sampling, a function of (seed, t)
    n_k          = the roster's example counts of ids (0 for Poisson padding)
    replies      = train messages with download(w_G^t) -> ClientOutput rows [1, ...] (exchange.py)
    out          = the rows stacked [C, ...] in the sampled order (a dropped client: report 0)
    state, m     = server_phase(state, RoundData(ids, n_k), out)   aggregator + server optimizer

then the same row (rounds, losses, counts, bytes; evaluation every eval.every rounds), the same
files (metrics.jsonl, TensorBoard events, Orbax checkpoint of step t+1, summary.json; the row is
written before its checkpoint) and the same resume, all by the simulation's own writer: the run is
one ``experiments.trainer.Member``, and the deployment adds its ``deploy_*`` keys as a metric
hook. Resume: a killed server restarted on the same workdir continues from the last checkpoint,
with rows equal to an unbroken run's. Each row adds what only
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

from experiments import train, trainer, writers
from fedgen.io import checkpoint
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


def run(grid: Grid, opts: spec.RunOptions) -> dict:
    """Runs (or resumes) the deployed job; returns the summary dict (module docstring). The run
    is one experiments.trainer Member: the trainer's resume, rows, bytes, epsilon, evaluations,
    checkpoints and summary, with the client phase done by the network."""
    t_start = time.time()
    run, workdir = opts.run, opts.workdir
    spec.check_run(run)
    os.makedirs(workdir, exist_ok=True)
    train.check_workdir(run, workdir)
    r = train.setup(run, workdir)
    task, alg, frozen = r['task'], r['alg'], r['frozen']
    spec.check_algorithm(alg, r['state'].trainable, run.method.name)
    one = client_app.one_client(run, task, r['steps'], 0, 0)
    template = client_app.outgoing(jax.eval_shape(alg.client_phase, r['state'], frozen, one))
    # The server holds no client rows: they live on the clients' nodes (module docstring).
    setup = {**r, 'state': r['state'].replace(clients={})}
    member = trainer.Member(run, setup, workdir, workdir, extra={'deployed': True})
    start, (host, ) = trainer.restore([member], True)
    if start:
        print(f'resumed from round {start}', flush=True)
    rounds, num_clients = run.schedule.rounds, run.clients.num_clients
    try:
        member.open(start, True)
        roster = exchange.discover(grid, num_clients, opts.connect_timeout)
        print(f'roster: {num_clients} clients on {len(set(roster.node_of.values()))} SuperNode(s)',
              flush=True)
        server_phase = jax.jit(alg.server_phase)
        state = jax.device_put(host)
        last_used = personal.last_used(member.writer.rows)
        try:
            for rnd in range(start, rounds):
                t0 = time.time()
                exchange.refresh(grid, roster)
                ids, present = run.sample_round(rnd)
                n_k = roster.n_k[ids] * (1.0 if present is None else np.asarray(
                    present, np.float32))
                data = batching.RoundData(client_ids=ids.astype(np.int32),
                                          batches={},
                                          mask=np.zeros((len(ids), 0), np.float32),
                                          n_k=n_k.astype(np.float32))
                print(f'round {rnd + 1}/{rounds}: training clients {[int(i) for i in ids]}',
                      flush=True)
                down = RecordDict({'down': wire.to_record(alg.download(host.trainable))})
                trip = exchange.run_round(grid, roster, rnd, ids, n_k > 0, down, template,
                                          opts.round_timeout, last_used)
                t1 = time.time()
                state, m = server_phase(state, data, exchange.stack_rows(trip.rows, template))
                host, m = jax.device_get((state, m))
                used = [int(i) for i, x in zip(ids, np.ravel(m['live'])) if x > 0]
                deployed = {
                    'deploy_client_ids': [int(i) for i in ids],
                    'deploy_dropped': trip.dropped,
                    'deploy_used_ids': used,
                    'deploy_wire_up_bytes': trip.wire_up,
                    'deploy_wire_down_bytes': trip.wire_down,
                    'deploy_payload_up_bytes': trip.payload_up,
                    **row_timings(trip,
                                  time.time() - t1)
                }
                member.round(rnd + 1, host, m, ids, n_k > 0,
                             time.time() - t0, [lambda *_: deployed], False)
                if member.error is not None:
                    raise ValueError(member.error)
                last_used.update({i: rnd for i in used})
                row = member.writer.rows[-1]
                print(
                    f'round {rnd + 1}/{rounds}: clients {row["deploy_client_ids"]} dropped '
                    f'{trip.dropped}  {train.fmt({k: v for k, v in row.items() if k in PROGRESS})}'
                    f'  {row["round_s"]:.1f} s',
                    flush=True)
        finally:
            checkpoint.wait(member.mngr)
        summary = member.finish(host, trainer.costs(member), t_start, False)
    finally:
        if hasattr(member, 'writer'):
            member.writer.close()
    print('summary: ' + json.dumps(summary), flush=True)
    return summary


PROGRESS = ('train_loss', 'clients_used', 'valid_ppl', 'up_bytes_round', 'deploy_wire_up_bytes')


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: the run's options from its run config, then :func:`run`."""
    workdir = str(context.run_config.get('workdir', ''))
    try:
        run(grid, spec.run_options(context.run_config))
    except ValueError as e:  # fedgen's one-line errors; the status file tells the launcher
        writers.write_atomic(os.path.join(workdir, 'deploy_error.txt'), str(e))
        print(f'error: {e}', flush=True)
        raise
