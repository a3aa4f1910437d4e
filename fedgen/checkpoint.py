"""Orbax checkpoints of the server state under ``<workdir>/checkpoints``, step = rounds done.

Items are saved as plain state dicts (``flax.serialization.to_state_dict``), one Orbax item per
name (``state`` and, after personalization, ``personal``), and restored into a template of the same
structure. Saving is asynchronous; call ``wait`` before reading files or exiting.
"""
import os
from typing import Any

import orbax.checkpoint as ocp
from flax import serialization

PyTree = Any


def manager(workdir: str, keep: int, items: tuple[str, ...] = ('state', )) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last ``keep`` steps (config field checkpoint.keep)."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f'checkpoint.keep must be an int >= 1, got {keep!r}')
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    return ocp.CheckpointManager(directory,
                                 item_names=items,
                                 options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                      create=True))


def save(mngr: ocp.CheckpointManager, step: int, **items: PyTree) -> None:
    """Saves each named item (a pytree, converted to a state dict) at ``step``."""
    args = {k: ocp.args.StandardSave(serialization.to_state_dict(v)) for k, v in items.items()}
    mngr.save(step, args=ocp.args.Composite(**args))


def restore(mngr: ocp.CheckpointManager, step: int, **templates: PyTree) -> dict:
    """Restores the named items at ``step`` into their templates' structures.

    Raises a one-line ValueError naming the checkpoint directory when it cannot be read.
    """
    try:
        got = mngr.restore(step,
                           args=ocp.args.Composite(
                               **{
                                   k: ocp.args.StandardRestore(serialization.to_state_dict(v))
                                   for k, v in templates.items()
                               }))
        return {k: serialization.from_state_dict(v, got[k]) for k, v in templates.items()}
    except Exception as e:  # orbax raises many types; surface one clear line
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f'checkpoint at {mngr.directory} step {step} is unreadable or does not '
                         f'match this config ({type(e).__name__}: {msg})') from e


def latest(mngr: ocp.CheckpointManager) -> int | None:
    """The newest saved step, or None."""
    return mngr.latest_step()


def wait(mngr: ocp.CheckpointManager) -> None:
    mngr.wait_until_finished()


def save_tree(path: str, tree: PyTree) -> None:
    """Saves one pytree (e.g. a pre-trained backbone) to ``path`` with Orbax, synchronously."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), serialization.to_state_dict(tree))
    ckptr.wait_until_finished()


def load_tree(path: str, template: PyTree | None, field: str) -> PyTree:
    """Restores a pytree saved by :func:`save_tree` into ``template``'s structure (or, with
    ``template=None``, as the nested dicts it was saved as).

    ``field`` names the config entry in the one-line ValueError raised on a missing/corrupt file.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f'{field}: no saved tree at {path}')
    try:
        if template is None:
            return ocp.StandardCheckpointer().restore(path)
        got = ocp.StandardCheckpointer().restore(path, serialization.to_state_dict(template))
        return serialization.from_state_dict(template, got)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f'{field}: {path} is unreadable or does not match the model '
                         f'({type(e).__name__}: {msg})') from e


def personal_path(workdir: str, step: int) -> str:
    """Where the stacked personal trees of round ``step`` live: <workdir>/personal/<step>."""
    return os.path.join(os.path.abspath(workdir), 'personal', str(int(step)))


def save_personal(workdir: str, step: int, personal: PyTree) -> str:
    """Saves personal trainable trees [N, ...] (after the server state of round ``step``) as
    their own Orbax item beside ``checkpoints/``, replacing an earlier one; returns its path."""
    path = personal_path(workdir, step)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, serialization.to_state_dict(personal), force=True)
    ckptr.wait_until_finished()
    return path


def load_personal(workdir: str, step: int, template: PyTree) -> PyTree:
    """Restores what :func:`save_personal` wrote for round ``step`` into ``template``."""
    return load_tree(personal_path(workdir, step), template, 'personalize --workdir')
