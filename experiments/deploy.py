"""A fedgen run on Flower's deployment runtime, on this machine: SuperLink, SuperNodes, the run.

    python -m experiments.deploy --config configs/ptb_fedgen_edge.py:tiny --clients 4 \
        --workdir runs/deploy_tiny
    python -m experiments.deploy --config configs/ptb_fedgen_edge.py --clients 10 --workdir W

Starts a SuperLink (insecure, 127.0.0.1 only), ``--clients`` SuperNodes as separate processes
(SuperNode j holds the partition's client ids k with k mod clients = j, so with clients =
fed.num_clients every client is its own process), then ``flwr run`` of fedgen's app
(fedgen/deploy/flower): the ServerApp samples, aggregates, evaluates and writes what
experiments.train writes into --workdir (metrics.jsonl with extra ``deploy_*`` fields,
summary.json, TensorBoard events, Orbax checkpoints); the ClientApps run the local updates.
Prints the ServerApp's per-round progress. Everything it started is stopped when the run ends or
fails, on Ctrl-C and on SIGTERM; rerunning the command resumes the run from its last checkpoint.
Flower's own logs are in <workdir>/flower/logs.

With ``--superlink host:port`` (``--root_certificates ca.crt`` for TLS) it submits the run to a
SuperLink that is already running, e.g. one that SuperNodes on other machines connect to, and
starts only ``--clients`` local SuperNodes (0: none); see docs/deploy.md.

A bad config or flag prints one line, ``error: ...``, and exits with status 2 before anything
starts; a run that fails or does not finish within --run_timeout exits with status 1.
"""
import os
import signal
import sys
import threading
import time
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from experiments import translate
from experiments.console import log, run_main
from fedgen.deploy.flower import cluster as cluster_lib
from fedgen.deploy.flower import spec


def check(config, clients: int, external: bool = False) -> None:
    """One-line errors for the config and the launcher's flags, before any process starts.
    With an external SuperLink (``external``), --clients may be 0 (every SuperNode elsewhere)."""
    run = translate.spec(config)
    spec.check_run(run)
    n, low = run.clients.num_clients, 0 if external else 1
    if not (isinstance(clients, int) and low <= clients <= n):
        raise ValueError(f'--clients must be in [{low}, fed.num_clients={n}], got {clients!r}')


def node_configs(clients: int, num_clients: int, cache_dir: str) -> list[dict]:
    """SuperNode j's node config: client ids {k < N : k mod clients = j} and the cache dir."""
    return [{
        'client-ids': ' '.join(str(k) for k in range(j, num_clients, clients)),
        'cache-dir': cache_dir
    } for j in range(clients)]


def deploy(config,
           clients: int,
           workdir: str,
           round_timeout: float = 600.0,
           connect_timeout: float = 120.0,
           run_timeout: float = 7200.0,
           on_line: Callable | None = None,
           superlink: str = '',
           root_certificates: str = '') -> dict:
    """Runs (or resumes) ``config`` on a local Flower federation; returns {'ok', 'summary' (the
    ServerApp's summary line, or None), 'error' (its one-line error, or None), 'lines'}.

    ``on_line(line, cluster)`` sees every line of the ServerApp's log as it streams (tests use it
    to kill a SuperNode mid-round). ``superlink`` (host:port): submit to that running SuperLink
    (TLS with the CA file ``root_certificates``) instead of starting one; --clients SuperNodes
    are still started here. Every process started is stopped before this returns or raises."""
    check(config, clients, bool(superlink))
    workdir = os.path.abspath(workdir)
    root = os.path.join(workdir, 'flower')
    os.makedirs(root, exist_ok=True)
    error_path = os.path.join(workdir, 'deploy_error.txt')
    if os.path.exists(error_path):
        os.remove(error_path)
    env = {  # every ClientApp is a fresh process: keep its compiled programs across rounds
        'JAX_COMPILATION_CACHE_DIR': os.path.join(workdir, 'xla_cache'),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
        'PYTHONUNBUFFERED': '1',
        'FLWR_SUPEREXEC_TASK_POLL_INTERVAL': '0.2',  # start a message's ClientApp within 0.2 s
        # the apps import experiments/ (train's setup, the writers): this checkout's root
        'PYTHONPATH': os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    }
    fleet = cluster_lib.Cluster(root, node_configs(clients, config.fed.num_clients, workdir), env,
                                superlink, root_certificates)
    lines, summary = [], None
    try:
        fleet.start()
        log(f'SuperLink {fleet.address}, {clients} local SuperNode(s); logs in {root}/logs')
        run = fleet.submit({
            'config-json': config.to_json_best_effort(),
            'workdir': workdir,
            'round-timeout': float(round_timeout),
            'connect-timeout': float(connect_timeout)
        })
        timer = threading.Timer(run_timeout, lambda: cluster_lib._kill_group(run, signal.SIGKILL))
        timer.daemon = True
        timer.start()
        try:
            for raw in run.stdout:
                line = _plain(raw.decode(errors='replace'))
                if not line:
                    continue
                lines.append(line)
                if line.startswith('summary: '):
                    summary = line[len('summary: '):]
                elif _shown(line):
                    log(line)
                if on_line is not None:
                    on_line(line, fleet)
            run.wait(timeout=30)
        finally:
            timer.cancel()
    finally:
        fleet.stop()
    error = open(error_path).read().strip() if os.path.exists(error_path) else None
    return {'ok': summary is not None, 'summary': summary, 'error': error, 'lines': lines}


def _plain(line: str) -> str:
    """A log line without ANSI colours, Flower's level prefix and surrounding space."""
    for code in ('\x1b[92m', '\x1b[93m', '\x1b[91m', '\x1b[0m', '\x1b[1m'):
        line = line.replace(code, '')
    line = line.strip()
    for level in ('INFO :', 'WARNING :', 'ERROR :', 'DEBUG :'):
        head = line.split(':', 1)[0].strip() + ' :'
        if head == level:
            return line.split(':', 1)[1].strip()
    return line


def _shown(line: str) -> bool:
    """Whether a ServerApp log line is fedgen's progress or a warning, not Flower's (an error
    reaches the console once: from deploy_error.txt, or in the log's tail)."""
    return line.startswith(('round ', 'roster', 'backbone', 'resumed', 'warning', 'data',
                            'client chunk', 'checkpoint'))


FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags() -> None:
    config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, caches and logs.')
    flags.DEFINE_integer('clients', None, 'SuperNodes to start (client processes).')
    flags.DEFINE_float(
        'round_timeout', 600.0, 'Seconds the server waits for a round\'s '
        'replies; a client that misses it counts as dropped.')
    flags.DEFINE_float('connect_timeout', 120.0, 'Seconds to wait for every client to connect.')
    flags.DEFINE_float('run_timeout', 7200.0, 'Seconds after which the run is stopped.')
    flags.DEFINE_string(
        'superlink', '', 'host:port of a running SuperLink to submit the run to '
        '(none is started here; SuperNodes on other machines connect to it).')
    flags.DEFINE_string(
        'root_certificates', '', 'CA certificate (PEM) of that SuperLink\'s TLS; '
        'without it the connection is insecure.')


def main(argv):
    del argv
    if FLAGS.config is None or FLAGS.workdir is None or FLAGS.clients is None:
        raise app.UsageError('--config, --workdir and --clients are required')
    for name in ('round_timeout', 'connect_timeout', 'run_timeout'):
        if not getattr(FLAGS, name) > 0:
            raise ValueError(f'--{name} must be > 0, got {getattr(FLAGS, name)}')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> the finally blocks stop all
    t0 = time.time()
    out = deploy(FLAGS.config,
                 FLAGS.clients,
                 FLAGS.workdir,
                 FLAGS.round_timeout,
                 FLAGS.connect_timeout,
                 FLAGS.run_timeout,
                 superlink=FLAGS.superlink,
                 root_certificates=FLAGS.root_certificates)
    if out['error']:
        raise ValueError(out['error'])
    if not out['ok']:
        tail = '\n'.join(out['lines'][-15:])
        print(f'{tail}\nerror: the deployed run did not finish (see {FLAGS.workdir}/flower/logs)',
              file=sys.stderr)
        sys.exit(1)
    log(f'summary: {out["summary"]}')
    log(f'deployed run finished in {time.time() - t0:.1f} s; files in {FLAGS.workdir}')


if __name__ == '__main__':
    define_flags()
    run_main(main)
