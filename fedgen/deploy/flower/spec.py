"""What both sides of a deployed run agree on: the run's options, the config, the message layout.

The run config (Flower's ``--run-config``, seen by the ServerApp and every ClientApp) carries the
fedgen config as JSON; each side translates it once into the run's RunSpec
(experiments.translate.spec), so the clients build exactly the server's task, partition, backbone
recipe and algorithm. A node's own config (``flower-supernode --node-config``) says which client
ids it serves and where its caches are:

    client-ids = "0 4 8"     the partition's client ids this SuperNode holds (space-separated)
    cache-dir  = "<dir>"     where <dir>/backbone/<recipe hash> is read (or pre-trained once)
                             and the clients' persistent rows are kept (<dir>/client_rows/)

Messages (content names):

    query  server -> node   {}                                 which clients do you hold?
           node -> server   config 'ids' [m], 'n-k' [m]        their ids and example counts n_k
    train  server -> node   arrays 'down' (download(w_G^t)),   one client's round t
                            config 'client-id', 'round',
                            'last-used' (the last round < t whose upload counted, -1 none)
           node -> server   arrays 'out' (ClientOutput [1, ...] without ``kept``), metrics
                            'num-examples', 'train-loss', timings
"""
import dataclasses
import json
from typing import Any

import jax
import ml_collections

from experiments import translate
from fedgen.fl import comm

QUERY, TRAIN = 'query', 'train'
# Methods whose client phase needs the global download and, for ditto / fedsa / local_only, the
# client's own persistent row (kept on its node, personal.py); no server-side frozen delta
# (FedEx-LoRA) and no partial download of a global tree that moves (FFA-LoRA's B only).
DEPLOYABLE = ('fedgen_edge', 'fedavg_full', 'fedprox', 'ditto', 'fedsa', 'local_only')


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """run: the run's RunSpec (experiments.runspec), translated once from the run config's
    config JSON; workdir: the server's run directory; round_timeout: seconds the server waits for
    a round's replies (clients that miss it count as dropped); connect_timeout: seconds it waits
    until every client id is served by some node."""
    run: Any
    workdir: str
    round_timeout: float
    connect_timeout: float


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """The locked ConfigDict of ``config.to_json_best_effort()``'s text."""
    c = ml_collections.ConfigDict(json.loads(text))
    c.lock()
    return c


def run_options(run_config) -> RunOptions:
    """RunOptions from a Flower run config (the app's keys, see cluster.APP_TOML)."""
    text = str(run_config.get('config-json', ''))
    if not text:
        raise ValueError('the run config has no config-json (start runs with experiments.deploy)')
    return RunOptions(translate.spec(config_from_json(text)), str(run_config.get('workdir', '')),
                      float(run_config.get('round-timeout', 600.0)),
                      float(run_config.get('connect-timeout', 120.0)))


def node_client_ids(node_config) -> list[int]:
    """The client ids a node serves, from its node config ``client-ids``."""
    raw = str(node_config.get('client-ids', '')).replace(',', ' ').split()
    try:
        return [int(x) for x in raw]
    except ValueError:
        raise ValueError(f'node config client-ids must be integers, got {raw!r}') from None


def check_run(run) -> None:
    """One-line ValueError for runs (RunSpecs) the deployment does not run (before any
    compute)."""
    name = run.method.name
    if name not in DEPLOYABLE:
        raise ValueError(f'fed.algorithm={name!r} is not deployable yet: the deployed '
                         f'methods are {", ".join(DEPLOYABLE)}')
    if run.lora_aggregation not in ('avg_ab', ):
        raise ValueError(f'fed.lora_aggregation={run.lora_aggregation!r} is not deployable yet '
                         '(only avg_ab sends the whole adapter both ways)')
    if run.method.client_ranks is not None:
        raise ValueError('lora.client_ranks is not deployable yet (heterogeneous ranks)')
    if run.clients.num_devices not in (0, 1):
        raise ValueError('fed.num_devices must be 0 or 1 for a deployed run (one server process)')


def check_algorithm(alg, trainable, name: str) -> None:
    """One-line ValueError unless ``alg`` (config fed.algorithm ``name``) has separate phases and
    downloads the whole tree; FedSA (A only: its global B never moves) and local-only (nothing)
    download part of it, and a client fills the rest from the initial tree."""
    if alg.client_phase is None or alg.server_phase is None:
        raise ValueError('this method has no separate client and server phases to deploy')
    down = jax.eval_shape(alg.download, trainable)
    if name in ('fedsa', 'local_only'):
        return
    if jax.tree.structure(down) != jax.tree.structure(trainable) or comm.num_bytes(
            down) != comm.num_bytes(trainable):
        raise ValueError('this method does not download the whole trainable tree; not deployable')
