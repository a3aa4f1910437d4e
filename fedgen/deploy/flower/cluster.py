"""A Flower federation on one machine: a SuperLink, N SuperNodes and a run, each its own process.

    cluster = Cluster(root, nodes=[{'client-ids': '0 2', 'cache-dir': W}, ...])
    cluster.start()                        SuperLink, then the SuperNodes (bounded waits)
    run = cluster.submit(run_config)       ``flwr run`` of fedgen's app; its log streams back
    cluster.kill_node(j)                   SIGKILL SuperNode j and everything it started
    cluster.stop()                         every process this object started, also on errors

Everything listens on 127.0.0.1 only, without TLS (``--insecure``): the SuperLink's one HTTP port
(Fleet, Control and ServerAppIo APIs in flwr 1.42) and each SuperNode's runtime port. Each
process is started in its own process group, so stopping one also ends what it spawned (the
SuperExec and the ``flwr-serverapp`` / ``flwr-clientapp`` processes), and gets SIGTERM when the
launcher dies, even by SIGKILL (Linux's parent-death signal). Flower's own state
(``FLWR_HOME``: the CLI's connection file, installed app bundles) lives under ``root``;
telemetry and update checks are off, so nothing leaves the machine.

With ``superlink='host:port'`` the cluster uses a SuperLink started elsewhere (another machine,
TLS when a CA file is given): it starts no SuperLink, only the SuperNodes it is given (none, when
the clients run on their own machines), and submits the run there.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import tomli_w

# The Flower app bundle (FAB): a pyproject.toml naming fedgen's ServerApp and ClientApp. The
# code itself is the installed fedgen package, so the bundle carries no source.
APP_TOML = {
    'build-system': {
        'requires': ['hatchling'],
        'build-backend': 'hatchling.build'
    },
    'project': {
        'name': 'fedgen-deploy',
        'version': '0.1.0',
        'description': 'FedGen-Edge on the Flower deployment runtime',
        'license': 'Apache-2.0',
        'dependencies': []
    },
    'tool': {
        'flwr': {
            'app': {
                'publisher': 'fedgen',
                'components': {
                    'serverapp': 'fedgen.deploy.flower.server_app:app',
                    'clientapp': 'fedgen.deploy.flower.client_app:app'
                },
                # Every key a run may override (--run-config); see server_app.RunOptions.
                'config': {
                    'config-json': '',
                    'workdir': '',
                    'round-timeout': 600.0,
                    'connect-timeout': 120.0
                }
            }
        }
    }
}
CONNECTION = 'fedgen'  # the name of the SuperLink connection in FLWR_HOME/config.toml
# Runs argv[2:] tied to the launcher (pid argv[1]): Linux's parent-death signal (prctl
# PR_SET_PDEATHSIG = 1) makes the kernel SIGTERM it when the launcher dies, even by SIGKILL, and
# survives the exec. Set in a fresh interpreter, not in a preexec_fn of this (threaded) process.
EXEC_TIED = '''
import ctypes, os, signal, sys
try:
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the launcher died before the signal was armed
os.execvp(sys.argv[2], sys.argv[2:])
'''


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    """Returns once 127.0.0.1:port accepts connections; RuntimeError when ``proc`` exits first
    or after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f'{what} exited with status {proc.returncode} before listening')
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f'{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s')


def exe(name: str) -> str:
    """Flower's console script ``name`` beside this Python (the same environment), else PATH's."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name


def node_config_arg(config: dict) -> str:
    """``--node-config``'s value: space-separated key=value pairs, values as TOML literals."""
    return ' '.join(f'{k}={tomli_w.dumps({"v": v})[4:].strip()}' for k, v in config.items())


class Cluster:
    """SuperLink + SuperNodes under ``root`` (logs: root/logs/*.log); see the module docstring.

    nodes: one dict of node config per SuperNode (the ClientApp reads it: which client ids the
    node serves and where its caches are). ``env``: extra environment for every process.
    ``superlink`` (host:port): use that running SuperLink instead of starting one (its SuperNodes
    are started elsewhere; ``nodes`` may be empty); TLS with ``root_certificates`` (a CA file),
    else insecure."""

    def __init__(self,
                 root: str,
                 nodes: list[dict],
                 env: dict | None = None,
                 superlink: str = '',
                 root_certificates: str = ''):
        self.root, self.nodes = os.path.abspath(root), nodes
        self.external, self.certificates = superlink, root_certificates
        self.home = os.path.join(self.root, 'flwr_home')
        self.logs = os.path.join(self.root, 'logs')
        self.app_dir = os.path.join(self.root, 'app')
        self.env = {
            **os.environ, 'FLWR_HOME': self.home,
            'FLWR_TELEMETRY_ENABLED': '0',
            'FLWR_DISABLE_UPDATE_CHECK': '1',
            **(env or {})
        }
        self.port = None
        self.address = superlink or None
        self.superlink = None
        self.supernodes: list[subprocess.Popen | None] = []
        self.runs: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], log_name: str, stdout=None) -> subprocess.Popen:
        log = open(os.path.join(self.logs, log_name), 'ab')
        try:
            return subprocess.Popen([sys.executable, '-c', EXEC_TIED,
                                     str(os.getpid()), *args],
                                    stdout=stdout or log,
                                    stderr=subprocess.STDOUT if stdout is None else log,
                                    env=self.env,
                                    cwd=self.root,
                                    start_new_session=True)
        finally:
            log.close()

    def write_app(self) -> None:
        """The app bundle's pyproject.toml and the CLI's connection to this SuperLink."""
        os.makedirs(self.app_dir, exist_ok=True)
        with open(os.path.join(self.app_dir, 'pyproject.toml'), 'wb') as f:
            tomli_w.dump(APP_TOML, f)
        os.makedirs(self.home, exist_ok=True)
        tls = ({
            'root-certificates': os.path.abspath(self.certificates)
        } if self.certificates else {
            'insecure': True
        })
        with open(os.path.join(self.home, 'config.toml'), 'wb') as f:
            tomli_w.dump(
                {
                    'superlink': {
                        'default': CONNECTION,
                        CONNECTION: {
                            'address': self.address,
                            **tls
                        }
                    }
                }, f)

    def start(self, timeout: float = 60.0) -> None:
        """Starts the SuperLink, waits until it listens, then starts every SuperNode (with an
        external SuperLink: only the SuperNodes)."""
        os.makedirs(self.logs, exist_ok=True)
        if self.external:
            self.write_app()
            self.supernodes = [self.start_node(j) for j in range(len(self.nodes))]
            return
        self.port = free_port()
        self.address = f'127.0.0.1:{self.port}'
        self.write_app()
        self.superlink = self._spawn([
            exe('flower-superlink'), '--insecure', '--host', '127.0.0.1', '--port',
            str(self.port), '--database',
            os.path.join(self.root, 'superlink.db'), '--disable-runtime-dependency-installation'
        ], 'superlink.log')
        wait_port(self.port, timeout, self.superlink, 'the SuperLink')
        for j in range(len(self.nodes)):
            self.supernodes.append(self.start_node(j))

    def start_node(self, j: int) -> subprocess.Popen:
        """SuperNode j (node config ``nodes[j]``) connected to this SuperLink."""
        return self._spawn([
            exe('flower-supernode'), *self._tls(), '--superlink', self.address, '--host',
            '127.0.0.1', '--port',
            str(free_port()), '--max-wait-time', '120', '--node-config',
            node_config_arg(self.nodes[j])
        ], f'supernode_{j}.log')

    def _tls(self) -> list[str]:
        return ['--root-certificates', self.certificates] if self.certificates else ['--insecure']

    def submit(self, run_config: dict) -> subprocess.Popen:
        """``flwr run`` of fedgen's app with ``run_config`` (the app's config keys); its stdout
        (the ServerApp's log, streamed) is a pipe of the returned process."""
        path = os.path.join(self.root, f'run_config_{len(self.runs)}.toml')
        with open(path, 'wb') as f:
            tomli_w.dump(run_config, f)
        run = self._spawn(
            [exe('flwr'), 'run', self.app_dir, CONNECTION, '--stream', '--run-config', path],
            f'flwr_run_{len(self.runs)}.log', subprocess.PIPE)
        self.runs.append(run)
        return run

    def kill_node(self, j: int) -> None:
        """SIGKILL SuperNode j and its process group (its SuperExec and ClientApp processes)."""
        _kill_group(self.supernodes[j], signal.SIGKILL)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each process this cluster started (so it shuts down and reaps what it
        spawned), then, after ``grace`` seconds, SIGKILL whatever is left of their process
        groups. Safe to call more than once."""
        procs = [p for p in self.runs + self.supernodes + [self.superlink] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            _kill_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Sends ``sig`` to ``proc``'s process group (its own session, see Cluster._spawn)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
