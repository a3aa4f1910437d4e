"""fedgen's ClientApp: one client's half of a round, on the node that holds the client's data.

For a ``train`` message of round t (0-based rounds done) for client k, with the download w_G^t:

    data_k = pack_clients([k], seed, t)        the simulation's packing of client k's shard:
                                               [1, S, B, ...] batches, [1, S] mask, n_k
    out_k  = client_phase(state(t, w_G^t), frozen, data_k)      ClientOutput rows [1, ...]

``state(t, w)`` is the run's initial ServerState (same seed, so the same base key) at round t with
trainable w (a partial download, FedSA's A or local-only's nothing, is completed from the initial
tree: the leaves it leaves out never move on the server); client k's key is
fold_in(fold_in(rng, t), k) and its fate is drawn from its id, so out_k equals row k of the
simulation's [C, ...] client phase. The reply carries out_k without ``kept`` (nothing that stays
on a client leaves it), i.e. the upload ``sent``, the loss sum and weight, report / finite flags
and the update norm, plus Flower metrics (num-examples, the local train loss) and timings: setup
(imports, data, backbone), compile and compute seconds.

Methods with a persistent row per client (Ditto's v_k, FedSA's B_k, local-only's v_k; see
personal.py): the node reads client k's row v [...] of the last round whose upload counted (the
message's 'last-used'), runs client_phase on a state whose ``clients`` is v broadcast to [N, ...]
(so gather(clients, [k]) is v, exactly the simulation's row k), and writes
v + kept_k * live_k (live_k = sampled, reported and finite) as its row after round t.

The node's config names the client ids it holds and its cache directory (spec.py); a message for
any other id is refused. Flower 1.42 starts one ClientApp process per message, so the setup cost
is paid every round; ``JAX_COMPILATION_CACHE_DIR`` (set by experiments.deploy) keeps compiles
warm across rounds.
"""
import time

_T_START = time.time()  # before the heavy imports: a message's setup time includes them

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from experiments import train  # noqa: E402
from flax import traverse_util  # noqa: E402

from fedgen.fl import client_state  # noqa: E402
from fedgen.data import batching  # noqa: E402
from fedgen.deploy.flower import personal, spec, wire  # noqa: E402

app = ClientApp()
_SETUPS = {}  # (config json, cache dir) -> train.setup's dict; one per process in practice


def _setup(opts: spec.RunOptions, node_config) -> dict:
    key = (opts.run.record, str(node_config.get('cache-dir', '')))
    if key not in _SETUPS:
        spec.check_run(opts.run)
        cache = str(node_config.get('cache-dir', '')) or opts.workdir
        r = train.setup(opts.run, cache)
        spec.check_algorithm(r['alg'], r['state'].trainable, opts.run.method.name)
        _SETUPS[key] = r
    return _SETUPS[key]


def one_client(run, task, steps: int, cid: int, rnd: int) -> batching.RoundData:
    """Client ``cid``'s RoundData of round ``rnd``: [1, ...] rows, packed as the simulation does
    (``run``: the RunSpec)."""
    c = run.clients
    return batching.pack_clients(task.pool, task.client_train, [cid], run.seed, rnd, c.batch_size,
                                 c.local_epochs, steps, c.max_steps_per_epoch)


def outgoing(out):
    """What leaves the client: ClientOutput without ``kept``."""
    return out.replace(kept={})


def complete(initial, down):
    """The trainable tree: ``initial``'s leaves, replaced by every leaf ``down`` carries."""
    flat = dict(traverse_util.flatten_dict(initial))
    flat.update(traverse_util.flatten_dict(down))
    return traverse_util.unflatten_dict(flat)


def with_row(client_phase, num_clients: int):
    """client_phase on a state whose ``clients`` is one row [...], broadcast to [N, ...]."""

    def phase(state, frozen, data):
        return client_phase(state.replace(clients=client_state.tile(state.clients, num_clients)),
                            frozen, data)

    return phase


def _mine(context: Context, cid: int) -> None:
    ids = spec.node_client_ids(context.node_config)
    if cid not in ids:
        raise ValueError(f'this node holds clients {ids}, not client {cid}')


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Replies with the ids this node holds and their example counts n_k (for the roster)."""
    opts = spec.run_options(context.run_config)
    ids = spec.node_client_ids(context.node_config)
    task = opts.run.prepare_task()
    bad = [i for i in ids if not 0 <= i < len(task.client_train)]
    if bad:
        raise ValueError(f'node config client-ids {bad} are outside the partition\'s '
                         f'{len(task.client_train)} clients')
    n_k = [len(task.client_train[i]) for i in ids]
    return Message(RecordDict({'clients': ConfigRecord({'ids': ids, 'n-k': n_k})}), reply_to=msg)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One client's round: download -> client_phase -> the reply described above."""
    opts = spec.run_options(context.run_config)
    cfg = msg.content['config']
    cid, rnd = int(cfg['client-id']), int(cfg['round'])
    last = int(cfg.get('last-used', -1))
    _mine(context, cid)
    r = _setup(opts, context.node_config)
    data = one_client(opts.run, r['task'], r['steps'], cid, rnd)
    t0 = time.time()
    init, alg = r['state'], r['alg']
    down = wire.from_record(msg.content['down'], jax.eval_shape(alg.download, init.trainable))
    state = init.replace(round=jnp.asarray(rnd, jnp.int32),
                         trainable=jax.tree.map(jnp.asarray, complete(init.trainable, down)))
    keeps = opts.run.method.name in personal.PERSONAL
    phase = alg.client_phase
    if keeps:
        cache = str(context.node_config.get('cache-dir', '')) or opts.workdir
        key = personal.run_key(opts.run.record, opts.workdir)
        row = personal.start_row(cache, key, cid, last, init.clients)
        state = state.replace(clients=jax.tree.map(jnp.asarray, row))
        phase = with_row(phase, opts.run.clients.num_clients)
    t1 = time.time()
    step = jax.jit(phase).lower(state, r['frozen'], data).compile()
    t2 = time.time()
    out = jax.block_until_ready(step(state, r['frozen'], data))
    t3 = time.time()
    host = jax.device_get(out)
    if keeps:  # the simulation's clients[k] += kept_k * live_k, on this node
        live = float(host.report[0] * host.finite[0] * (data.n_k[0] > 0))
        personal.save(personal.row_path(cache, key, cid, rnd),
                      personal.apply_kept(row, host.kept, live))
    record = wire.to_record(outgoing(host))
    t4 = time.time()
    loss = float(np.asarray(out.loss_sum)[0] / max(float(np.asarray(out.weight)[0]), 1.0))
    metrics = MetricRecord({
        'num-examples': int(data.n_k[0]),
        'train-loss': loss,
        'setup-s': t0 - _T_START,
        'compile-s': t2 - t1,
        'compute-s': t3 - t2,
        'serialize-s': (t1 - t0) + (t4 - t3),
        'handler-end': t4,
        'process-start': _T_START
    })
    return Message(RecordDict({'out': record, 'metrics': metrics}), reply_to=msg)
