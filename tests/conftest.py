"""Shared tiny fixtures (a tiny GPT federated problem on synthetic token data), the test tiers,
and the CI rule that a skipped test is a failure.

Tiers: tests marked ``heavy`` (multi-process, chaos, whole configs, the reproduce smoke) run in
their own pytest call (``-m heavy``) after the default tier (``-m "not heavy"``); ``.ci/run`` runs
both. With ``CI=true`` in the environment every skip (an ``importorskip`` of a missing torch, peft,
gguf or flwr wheel, a missing data package) fails the run instead of passing quietly.

Compilation: one persistent XLA cache per pytest run, shared by the xdist workers and the child
processes the tests start (JAX_COMPILATION_CACHE_DIR and friends are inherited); it is removed
when the run ends.

Order: xdist's ``--dist loadfile`` hands files to the workers in collection order, so the files
that take longest (SLOWEST_FIRST, from ``--durations`` on 2 cores) are collected first and the
short ones fill the tail; within a file the order is unchanged.
"""
import os
import shutil
import tempfile

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from fedgen import algorithms
from fedgen.lora import adapters as lora
from fedgen.tasks import objectives
from fedgen.data import batching
from fedgen.models import gpt

TINY = gpt.GPTConfig(vocab_size=29, n_positions=8, n_embd=16, n_layer=1, n_head=2)


class Tiny:
    """A tiny GPT, LoRA adapters, and 6 uneven clients over 60 random windows."""

    def __init__(self):
        self.model = gpt.GPT(TINY)
        self.loss_fn = objectives.next_token_loss(self.model)
        self.params = gpt.init_params(TINY, jax.random.PRNGKey(0))
        self.adapters = lora.init(jax.random.PRNGKey(1), self.params, 'attn', 2)
        rng = np.random.default_rng(0)
        self.pool = {'tokens': rng.integers(0, TINY.vocab_size, (60, 9)).astype(np.int32)}
        sizes = [3, 12, 7, 1, 20, 17]
        bounds = np.cumsum([0] + sizes)
        self.clients = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
        self.steps = batching.num_local_steps(sizes, 4, 2)

    def round_data(self, ids, rnd=0):
        return batching.pack_clients(self.pool, self.clients, ids, 0, rnd, 4, 2, self.steps)

    def algorithm(self, chunk, server='sgd'):
        server_tx = optax.sgd(1.0) if server == 'sgd' else optax.adam(1e-2)
        p = algorithms.MethodParams('fedgen_edge', 6, optax.adam(1e-2), server_tx, chunk=chunk)
        return algorithms.make(p, self.loss_fn)


@pytest.fixture(scope='session')
def tiny():
    return Tiny()


def write_ptb_corpus(directory) -> str:
    """Writes a tiny two-topic corpus as ptb.{train,valid,test}.txt into ``directory``."""
    rng = np.random.default_rng(0)
    topics = [[f'w{i}' for i in range(30)], [f'v{i}' for i in range(30)]]
    for split, n in (('train', 700), ('valid', 60), ('test', 60)):
        lines = (' '.join(rng.choice(topics[(s // 20) % 2], size=rng.integers(4, 10)))
                 for s in range(n))
        (directory / f'ptb.{split}.txt').write_text('\n'.join(lines) + '\n')
    return str(directory)


def write_image_folder(root) -> str:
    """10 classes of flat-colour 32x32 PNGs with noise: 10 train and 3 test images each."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 10), ('test', 3)):
        for k in range(10):
            d = root / split / f'class{k}'
            d.mkdir(parents=True)
            color = np.array([25 * k, 255 - 25 * k, (70 * k) % 255])
            for i in range(n):
                img = np.clip(color + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i:04d}.png')
    return str(root)


def random_inception_flat() -> dict:
    """Random FID-InceptionV3 variables {'/'-joined path: float32 array}: He-scaled kernels and
    near-identity BatchNorm, so pool3 activations stay O(1)."""
    from fedgen.metrics import inception
    rng = np.random.default_rng(0)
    flat = {}
    for key, shape in inception.expected_shapes().items():
        if key.endswith('kernel'):
            flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif key.endswith(('scale', 'var')):
            flat[key] = rng.uniform(0.5, 1.5, size=shape)
        else:
            flat[key] = 0.1 * rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in flat.items()}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A tiny PTB-format corpus directory (synthetic; tests never read the real data)."""
    return write_ptb_corpus(tmp_path_factory.mktemp('ptb'))


CACHE_ENV = 'FEDGEN_TEST_XLA_CACHE'


def _shared_cache_dir(tmp_path_factory) -> str:
    """The run's XLA cache directory: made by the controlling pytest process (pytest_configure)
    and inherited by the xdist workers and by every child process a test starts."""
    path = os.environ.get(CACHE_ENV)
    if path and os.path.isdir(path):
        return path
    return str(tmp_path_factory.mktemp('xla_cache'))


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the run: the many tiny runs compile the same
    evaluation and client programs again (new closures, same HLO) in other files, workers and
    child processes; the cache serves them (a cached executable is the same program). A size
    limit turns on the cache's file lock, so concurrent writers and readers never see half a
    file."""
    path = _shared_cache_dir(tmp_path_factory)
    settings = {
        'jax_compilation_cache_dir': path,
        'jax_persistent_cache_min_compile_time_secs': 0.2,
        'jax_persistent_cache_min_entry_size_bytes': 0,
        'jax_compilation_cache_max_size': 8 * 2**30,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    yield


# Test files by measured cost, slowest first (each tier's own; the rest follow in name order).
SLOWEST_FIRST = ('test_deploy', 'test_sharding', 'test_combinations', 'test_combinations_b',
                 'test_chaos', 'test_reproduce', 'test_configs', 'test_train_cifar', 'test_fmnist',
                 'test_sweep', 'test_train', 'test_ptb_task', 'test_llama', 'test_train_loop',
                 'test_unet', 'test_generate', 'test_engine', 'test_engine_round',
                 'test_lora_aggregation', 'test_population', 'test_algorithms', 'test_cli')


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept


def _ci() -> bool:
    return os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


def pytest_configure(config):
    if not os.environ.get('PYTEST_XDIST_WORKER') and not os.environ.get(CACHE_ENV):
        config.fedgen_xla_cache = tempfile.mkdtemp(prefix='fedgen-xla-cache-')
        os.environ[CACHE_ENV] = config.fedgen_xla_cache  # the workers inherit it
    config.addinivalue_line(
        'markers', 'heavy: a slow end-to-end test (multi-process, chaos, whole configs); '
        'its own tier: pytest -m heavy')


def pytest_unconfigure(config):
    if getattr(config, 'fedgen_xla_cache', None):
        shutil.rmtree(config.fedgen_xla_cache, ignore_errors=True)
        os.environ.pop(CACHE_ENV, None)


def _fail_skip(report) -> None:
    """Under CI=true a skipped outcome becomes a failure that names the skip reason."""
    if _ci() and report.skipped and not hasattr(report, 'wasxfail'):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = 'failed'
        report.longrepr = f'skipped under CI=true (a skip is a failure in CI): {reason}'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())
