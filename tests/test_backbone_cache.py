"""The backbone cache keeps its pre-training record: a run that reads a cached backbone reports
the seconds and final loss of the pre-training that built it."""
import jax
import numpy as np

from configs import ptb_fedgen_edge
from experiments import backbones, translate


def test_cached_backbone_carries_its_pretraining_record(corpus, tmp_path):
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source, c.data.verify_md5 = corpus, False
    spec = translate.spec(c)
    task = spec.prepare_task()
    first, made = backbones.pretrained(spec, task, str(tmp_path), jax.random.PRNGKey(0))
    assert made['pretrain_s'] > 0 and np.isfinite(made['pretrain_loss'])
    again, read = backbones.pretrained(spec, task, str(tmp_path), jax.random.PRNGKey(0))
    assert read == made
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))
    assert backbones.pretrain_record(str(tmp_path / 'absent')) == {}
