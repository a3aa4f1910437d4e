"""The server's side of the wire: which node holds which client, and one round's exchange.

Roster. Every SuperNode answers a ``query`` with the client ids it holds and their example
counts n_k; the server maps client id -> node id. Nodes that join later are queried when they
appear; a node that vanishes from the SuperLink's node list takes its clients out of the roster.

Exchange of round t over the sampled slots k = 1..C (ids_k, sampled_k = n_k > 0): one ``train``
message per sampled client to its node, all pushed at once; replies are pulled until every one
is in, the round's deadline passes, or the client's node leaves. A client whose reply does not
arrive, whose node is gone, or whose ClientApp raised, counts as dropped this round: its row is
zeros with report_k = 0, exactly a simulated dropout (weight 0; its download still counts).
"""
import dataclasses
import time

import jax
import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedgen.deploy.flower import spec, wire

POLL_S = 0.05  # pause between pulls of replies
NODES_EVERY_S = 2.0  # how often the node list is re-read while waiting


@dataclasses.dataclass
class Roster:
    """node_of[client id] = node id (absent: no node holds it now); n_k [N] example counts."""
    node_of: dict
    n_k: np.ndarray
    seen: set = dataclasses.field(default_factory=set)

    def missing(self) -> list[int]:
        return [i for i in range(len(self.n_k)) if i not in self.node_of]


def _ask(grid: Grid, nodes: list[int], roster: Roster, timeout: float) -> None:
    """Queries ``nodes`` for their clients and records the answers in ``roster``."""
    msgs = [Message(RecordDict({}), dst_node_id=n, message_type=spec.QUERY) for n in nodes]
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        roster.seen.add(node)
        if reply.has_error():
            print(
                f'warning: node {node} could not say which clients it holds: '
                f'{reply.error.reason}',
                flush=True)
            continue
        c = reply.content['clients']
        for cid, n in zip(c['ids'], c['n-k']):
            if 0 <= cid < len(roster.n_k):
                roster.node_of[int(cid)] = node
                roster.n_k[int(cid)] = n


def refresh(grid: Grid, roster: Roster, timeout: float = 60.0) -> None:
    """Drops the clients of nodes that left; queries nodes not seen before."""
    live = set(grid.get_node_ids())
    roster.node_of = {c: n for c, n in roster.node_of.items() if n in live}
    roster.seen &= live
    new = sorted(live - roster.seen)
    if new:
        _ask(grid, new, roster, timeout)


def discover(grid: Grid, num_clients: int, timeout: float) -> Roster:
    """The roster once every client id 0..N-1 is held by some node; ValueError (one line) after
    ``timeout`` seconds without that."""
    roster = Roster({}, np.zeros(num_clients, np.float32))
    end = time.monotonic() + timeout
    while True:
        refresh(grid, roster, max(1.0, end - time.monotonic()))
        if not roster.missing():
            return roster
        if time.monotonic() > end:
            raise ValueError(f'after {timeout:.0f} s no SuperNode holds clients '
                             f'{roster.missing()[:10]} (of {num_clients}); start a SuperNode with '
                             '--node-config client-ids=... for them')
        time.sleep(1.0)


@dataclasses.dataclass
class RoundTrip:
    """rows: per slot, the decoded ClientOutput row [1, ...] or None (dropped); dropped: their
    client ids; wire_up / wire_down: bytes of the replies' / requests' content as Flower
    serializes it; payload_up: bytes of the uploads' arrays (fedgen.fl.comm's count); metrics: per
    replying client, its MetricRecord as a dict; wall_s: from the first push to the last reply."""
    rows: list
    dropped: list
    wire_up: int
    wire_down: int
    payload_up: int
    metrics: list
    wall_s: float


def run_round(grid: Grid,
              roster: Roster,
              rnd: int,
              ids: np.ndarray,
              sampled: np.ndarray,
              down: RecordDict,
              template,
              timeout: float,
              last_used: dict | None = None) -> RoundTrip:
    """Round ``rnd``'s exchange (module docstring). ``down``: the broadcast's content (arrays
    'down'); ``template``: the ClientOutput row [1, ...] (arrays or shapes) replies decode to;
    ``last_used``: client id -> the last round whose upload counted (sent as 'last-used', -1
    when absent; the client's persistent row starts from that round's, see personal.py)."""
    t0 = time.monotonic()
    last_used = last_used or {}
    slot_of, msgs, wire_down = {}, [], 0
    for k, (cid, s) in enumerate(zip(ids, sampled)):
        node = roster.node_of.get(int(cid))
        if not s or node is None:
            continue
        content = RecordDict({
            'down':
            down['down'],
            'config':
            ConfigRecord({
                'client-id': int(cid),
                'round': int(rnd),
                'last-used': int(last_used.get(int(cid), -1))
            })
        })
        wire_down += wire.message_bytes(content)
        msgs.append(Message(content, dst_node_id=node, message_type=spec.TRAIN, group_id=str(rnd)))
        slot_of[len(msgs) - 1] = k
    msg_ids = list(grid.push_messages(msgs))
    pending = {m: (slot_of[i], msgs[i].metadata.dst_node_id) for i, m in enumerate(msg_ids)}
    rows, metrics, wire_up, payload_up = [None] * len(ids), [], 0, 0
    end, next_nodes = t0 + timeout, t0 + NODES_EVERY_S
    while pending and time.monotonic() < end:
        for reply in grid.pull_messages(list(pending)):
            k, node = pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                print(
                    f'warning: round {rnd + 1}: client {int(ids[k])} failed on node {node}: '
                    f'{reply.error.reason}',
                    flush=True)
                continue
            wire_up += wire.message_bytes(reply.content)
            row = wire.from_record(reply.content['out'], template)
            payload_up += wire.payload_bytes(row.sent)
            rows[k] = row
            metrics.append({'client_id': int(ids[k]), **dict(reply.content['metrics'])})
        if pending and time.monotonic() > next_nodes:
            live = set(grid.get_node_ids())
            for m, (k, node) in list(pending.items()):
                if node not in live:
                    pending.pop(m)
            next_nodes = time.monotonic() + NODES_EVERY_S
        if pending:
            time.sleep(POLL_S)
    dropped = [int(ids[k]) for k, s in enumerate(sampled) if s and rows[k] is None]
    return RoundTrip(rows, dropped, wire_up, wire_down, payload_up, metrics, time.monotonic() - t0)


def stack_rows(rows: list, template):
    """The [C, ...] ClientOutput of per-slot rows [1, ...]; a missing row (a dropped client or a
    padding slot) is zeros with report = 0 and finite = 1, i.e. it reported nothing."""
    empty = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    empty = empty.replace(finite=np.ones_like(empty.finite))
    return jax.tree.map(lambda *xs: np.concatenate(xs),
                        *[r if r is not None else empty for r in rows])
