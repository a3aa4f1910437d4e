"""Orbax checkpoints of the server state under ``<workdir>/checkpoints``, step = rounds done.

Items are saved as plain state dicts (``flax.serialization.to_state_dict``), one Orbax item per
name (``state`` and, after personalization, ``personal``), and restored into a template of the same
structure. Saving is asynchronous; call ``wait`` before reading files or exiting.

Integrity. Orbax's zstd chunks carry no checksum, so a flipped byte in an array file restores
silently with changed values. Every save therefore also writes a content digest,

    sha256( for each leaf in sorted key-path order: path, dtype, shape, C-order bytes ),

as a ``checksum`` JSON item of the same step (committed atomically with it), and as
``content.sha256.json`` inside a tree saved by :func:`save_tree`; loading recomputes and compares.
``save`` refuses a non-finite tree, so a diverged state can never rotate the good steps out of
``keep``. ``restore_latest`` falls back past unreadable newest steps and moves them aside to
``checkpoints/<step>.corrupt-<n>`` (Orbax does not list them); nothing is ever deleted here.
"""
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any
_DIGEST_ITEM = 'checksum'
_DIGEST_FILE = 'content.sha256.json'


def manager(workdir: str, keep: int, items: tuple[str, ...] = ('state', )) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last ``keep`` steps."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f'keep must be an int >= 1, got {keep!r}')
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    return ocp.CheckpointManager(directory,
                                 item_names=tuple(items) + (_DIGEST_ITEM, ),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                      create=True))


def _host(tree: PyTree) -> list[tuple[str, np.ndarray]] | None:
    """(key path, host array) for every leaf in sorted path order; None when some leaf lives
    partly on other hosts (then no digest is written or checked)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for _, v in flat):
        return None
    out = [(jax.tree_util.keystr(p), np.asarray(jax.device_get(v))) for p, v in flat]
    return sorted(out, key=lambda kv: kv[0])


def _digest_host(leaves: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for path, a in leaves:
        a = np.ascontiguousarray(a)
        h.update(f'{path}|{a.dtype.str}|{a.shape}|'.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _finite_host(leaves: list[tuple[str, np.ndarray]]) -> bool:
    return all(np.isfinite(a).all() for _, a in leaves if np.issubdtype(a.dtype, np.inexact))


def digest(tree: PyTree) -> str | None:
    """The sha256 content digest of a tree's leaves (see the module docstring); None when the
    tree is not fully addressable from this host."""
    leaves = _host(tree)
    return None if leaves is None else _digest_host(leaves)


def is_finite(tree: PyTree) -> bool:
    """True when every floating-point leaf of ``tree`` is free of NaN and inf."""
    for leaf in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            ok = jnp.isfinite(leaf).all()  # reduce where the shards live, fetch one bool
        else:
            ok = np.isfinite(np.asarray(jax.device_get(leaf))).all()
        if not bool(ok):
            return False
    return True


def cause(e: BaseException, limit: int = 200) -> str:
    """One line saying why ``e`` happened: the innermost message of its chain (TensorStore puts the
    reason last and appends a dump of its spec, which is dropped), cut to ``limit`` characters
    keeping the head and the tail."""
    chain, x = [], e
    while x is not None and len(chain) < 20:
        chain.append(x)
        x = x.__cause__ or x.__context__
    lines = []
    for x in reversed(chain):  # innermost first
        text = str(x).split('See full TensorStore details')[0].strip().rstrip('.')
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), '')
        if line:
            lines.append(f'{type(x).__name__}: {line}')
    msg = lines[0] if lines else type(e).__name__
    if len(msg) > limit:
        head = limit // 4
        msg = msg[:head] + ' ... ' + msg[len(msg) - (limit - head - 5):]
    return msg


def save(mngr: ocp.CheckpointManager, step: int, **items: PyTree) -> None:
    """Saves each named item (a pytree, converted to a state dict) at ``step``, with its digest.

    Raises ValueError, saving nothing, when an item holds NaN or inf: a diverged state must not
    push the good steps out of ``keep``.
    """
    trees = {k: serialization.to_state_dict(v) for k, v in items.items()}
    host = {k: _host(v) for k, v in trees.items()}
    bad = [
        k for k, v in trees.items()
        if not (is_finite(v) if host[k] is None else _finite_host(host[k]))
    ]
    if bad:
        raise ValueError(f'checkpoint: not saving step {step}: {", ".join(bad)} holds NaN or inf '
                         f'(the latest good step stays {mngr.latest_step()})')
    args = {k: ocp.args.StandardSave(v) for k, v in trees.items()}
    args[_DIGEST_ITEM] = ocp.args.JsonSave(
        {k: None if host[k] is None else _digest_host(host[k])
         for k in trees})
    mngr.save(step, args=ocp.args.Composite(**args))


def restore(mngr: ocp.CheckpointManager, step: int, **templates: PyTree) -> dict:
    """Restores the named items at ``step`` into their templates' structures, checking digests.

    Raises a one-line ValueError naming the checkpoint directory when it cannot be read, does not
    match the templates, or fails its content digest.
    """
    where = f'checkpoint at {mngr.directory} step {step}'
    step_dir = os.path.join(str(mngr.directory), str(step))
    args = {
        k: ocp.args.StandardRestore(serialization.to_state_dict(v))
        for k, v in templates.items()
    }
    has_digest = os.path.isdir(os.path.join(step_dir, _DIGEST_ITEM))
    if has_digest:
        args[_DIGEST_ITEM] = ocp.args.JsonRestore()
    try:
        got = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types; surface one clear line
        raise ValueError(f'{where} is unreadable or does not match this config '
                         f'({cause(e)})') from e
    if has_digest:
        for k in templates:
            want = (got[_DIGEST_ITEM] or {}).get(k)
            if want is not None and digest(got[k]) != want:
                raise ValueError(f'{where}: item {k!r} fails its content checksum (corrupt file)')
    return {k: serialization.from_state_dict(v, got[k]) for k, v in templates.items()}


def move_aside(path: str) -> str:
    """Renames ``path`` to ``<path>.corrupt-<n>`` (first free n) and returns the new path."""
    path = os.path.abspath(path)
    n = 0
    while os.path.exists(f'{path}.corrupt-{n}'):
        n += 1
    os.rename(path, f'{path}.corrupt-{n}')
    return f'{path}.corrupt-{n}'


def restore_latest(mngr: ocp.CheckpointManager,
                   **templates: PyTree) -> tuple[int | None, dict | None, list[str]]:
    """(step, items, warnings) from the newest step that restores and passes its checksums.

    Newer steps that fail are moved aside (never deleted), each with one warning line naming it
    and the step used. (None, None, []) when there are no steps. When no step restores, nothing
    is moved (the templates, i.e. the config, are the likelier culprit) and the newest step's
    ValueError is raised.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failed = []
    for step in steps:
        try:
            items = restore(mngr, step, **templates)
        except ValueError as e:
            failed.append((step, e))
            continue
        warnings = []
        for bad, e in failed:
            moved = move_aside(os.path.join(str(mngr.directory), str(bad)))
            warnings.append(f'checkpoint step {bad} is unreadable, resumed from step {step} '
                            f'instead; moved it to {moved} ({cause(e, 160)})')
        if failed:
            mngr.reload()
        return step, items, warnings
    if failed:
        raise failed[0][1]
    return None, None, []


def latest(mngr: ocp.CheckpointManager) -> int | None:
    """The newest saved step, or None."""
    return mngr.latest_step()


def wait(mngr: ocp.CheckpointManager) -> None:
    mngr.wait_until_finished()


def _write_digest(path: str, tree: PyTree) -> None:
    tmp = os.path.join(path, _DIGEST_FILE + '.tmp')
    with open(tmp, 'w') as f:
        json.dump({'sha256': digest(tree)}, f)
    os.replace(tmp, os.path.join(path, _DIGEST_FILE))


def save_tree(path: str, tree: PyTree) -> None:
    """Saves one pytree (e.g. a pre-trained backbone) to ``path`` with Orbax, synchronously, then
    its content digest (a kill in between leaves a tree that :func:`load_tree` rejects)."""
    path = os.path.abspath(path)
    state = serialization.to_state_dict(tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    _write_digest(path, state)


def load_tree(path: str, template: PyTree | None, field: str) -> PyTree:
    """Restores a pytree saved by :func:`save_tree` into ``template``'s structure (or, with
    ``template=None``, as the nested dicts it was saved as), verifying its content digest.

    ``field`` names the config entry in the one-line ValueError raised on a missing, unreadable,
    digest-less or corrupt tree (a cache should then be moved aside and rebuilt).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f'{field}: no saved tree at {path}')
    try:
        with open(os.path.join(path, _DIGEST_FILE)) as f:
            want = json.load(f)['sha256']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{field}: {path} has no readable content checksum (an interrupted save, '
                         f'or saved before checksums existed; {cause(e, 100)})') from e
    try:
        if template is None:
            got = ocp.StandardCheckpointer().restore(path)
        else:
            got = ocp.StandardCheckpointer().restore(path, serialization.to_state_dict(template))
    except Exception as e:
        raise ValueError(f'{field}: {path} is unreadable or does not match the model '
                         f'({cause(e)})') from e
    if digest(got) != want:
        raise ValueError(f'{field}: {path} fails its content checksum (corrupt file)')
    return got if template is None else serialization.from_state_dict(template, got)


def personal_path(workdir: str, step: int) -> str:
    """Where the stacked personal trees of round ``step`` live: <workdir>/personal/<step>."""
    return os.path.join(os.path.abspath(workdir), 'personal', str(int(step)))


def save_personal(workdir: str, step: int, personal: PyTree) -> str:
    """Saves personal trainable trees [N, ...] (after the server state of round ``step``) as
    their own Orbax item beside ``checkpoints/``, replacing an earlier one; returns its path."""
    path = personal_path(workdir, step)
    state = serialization.to_state_dict(personal)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state, force=True)
    ckptr.wait_until_finished()
    _write_digest(path, state)
    return path


def load_personal(workdir: str, step: int, template: PyTree) -> PyTree:
    """Restores what :func:`save_personal` wrote for round ``step`` into ``template``."""
    return load_tree(personal_path(workdir, step), template, 'personalize --workdir')
