"""fedgen pytrees on Flower's wire: one ArrayRecord entry per leaf, keyed by the leaf's path.

A tree T with leaves x_1..x_L (paths p_1..p_L, e.g. ``['lora']['h_0']['attn']['q']['a']``)
becomes the record {keystr(p_l): Array(x_l)}; the receiver knows T's structure (it runs the same
config) and rebuilds T from a template with the same paths, checking every shape and dtype, so a
peer with another config fails with one line instead of training on mismatched arrays.

Sizes. ``payload_bytes`` is sum_l nbytes(x_l), the count fedgen.fl.comm reports (shapes x dtype
sizes, no headers). ``message_bytes`` is what Flower actually transfers for a message's content: the
deflated bytes of every distinct object in the message's object tree (record and array headers,
the NumPy ``.npy`` header of each leaf, the array chunks; identical chunks are sent once).
"""
from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

PyTree = Any


def leaf_paths(tree: PyTree) -> list[str]:
    """The key of every leaf of ``tree``, in flattening order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def to_record(tree: PyTree) -> ArrayRecord:
    """{path: Array(leaf)} for every leaf of ``tree`` (host copies, dtype and shape kept)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ArrayRecord({
        jax.tree_util.keystr(p): Array(np.ascontiguousarray(np.asarray(x)))
        for p, x in flat
    })


def from_record(record: ArrayRecord, template: PyTree) -> PyTree:
    """The tree of ``template``'s structure whose leaves are ``record``'s arrays.

    ``template``'s leaves may be arrays or jax.ShapeDtypeStruct; a missing or extra key, or a
    leaf of another shape or dtype, is a one-line ValueError."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in flat]
    if set(keys) != set(record.keys()):
        missing, extra = sorted(set(keys) -
                                set(record.keys())), sorted(set(record.keys()) - set(keys))
        raise ValueError(f'message arrays do not match this run (missing {missing[:3]}, '
                         f'unexpected {extra[:3]}): are both sides on the same config?')
    leaves = []
    for key, (_, t) in zip(keys, flat):
        x = record[key].numpy()
        if t.shape == () and x.shape == (1, ):  # Flower stores a 0-d array as [1]
            x = x.reshape(())
        if tuple(x.shape) != tuple(t.shape) or np.dtype(x.dtype) != np.dtype(t.dtype):
            raise ValueError(f'message array {key} is {x.dtype}{list(x.shape)}, this run expects '
                             f'{np.dtype(t.dtype)}{list(t.shape)}')
        leaves.append(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def payload_bytes(tree: PyTree) -> int:
    """sum over leaves of size x itemsize: the bytes fedgen.fl.comm counts for a sent tree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def message_bytes(content: RecordDict) -> int:
    """Bytes Flower transfers for a message's ``content``: every distinct object of its object
    tree, deflated (headers, per-array metadata and chunks; the message's metadata fields, a
    few hundred bytes, are not included)."""
    return int(sum(len(o.deflate()) for o in get_all_nested_objects(content).values()))
