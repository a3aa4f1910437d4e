"""The tiny PTB training run the experiments.train / sweep / multi-process tests share, and what
they read back from its work directory (metrics rows, the newest checkpoint)."""
import json
import os

import orbax.checkpoint as ocp
import pytest

from configs import ptb_fedgen_edge


def tiny_ptb_config(corpus: str, backbone: str = '', rounds: int | None = None):
    """configs/ptb_fedgen_edge.py 'tiny' on the test ``corpus`` (no MD5 check); ``backbone``: a
    pre-trained backbone to reuse ('' = pre-train); ``rounds``: fed.rounds (None = the config's)."""
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source, c.data.verify_md5 = corpus, False
    if rounds is not None:
        c.fed.rounds = rounds
    c.pretrain.backbone_path = backbone
    return c


def metrics_rows(workdir: str, keep_time: bool = False) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl, one dict per round, parsed strictly (a bare NaN or
    Infinity fails the test); without the wall-clock ``round_s`` unless ``keep_time``."""
    strict = lambda c: pytest.fail(f'bare {c} in metrics.jsonl')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(x, parse_constant=strict) for x in f]
    return rows if keep_time else [{k: v for k, v in r.items() if k != 'round_s'} for r in rows]


def latest_state(workdir: str):
    """(step, state): the newest checkpoint under <workdir>/checkpoints, restored as saved (a
    tree of numpy arrays, no target structure)."""
    m = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
    step = m.latest_step()
    return step, m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
