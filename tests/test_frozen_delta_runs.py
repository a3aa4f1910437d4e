"""What consumes a finished run uses the model that was trained: a FLoRA (``stack``) run trains
W0 + dW + s A B with a server-side frozen delta dW, so personalization fine-tunes on W0 + dW and
export merges dW into --merged weights and refuses a plain PEFT adapter (one line saying why)."""
import chex
import jax
import numpy as np
import pytest

from configs import ptb_fedgen_edge
from experiments import export, train, translate
from experiments import personalize as personal_exp
from fedgen.aggregators import lora_math as lora_aggregation
from fedgen.lora import peft


@pytest.fixture(scope='module')
def stack_run(corpus, tmp_path_factory):
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source = corpus
    c.data.verify_md5 = False
    c.fed.lora_aggregation = 'stack'
    workdir = str(tmp_path_factory.mktemp('stack'))
    train.run(c, workdir)
    return c, workdir


def test_personalization_fine_tunes_on_the_trained_frozen_delta(stack_run):
    config, workdir = stack_run
    spec = translate.spec(config)
    run = personal_exp.restore(spec, workdir)
    delta = run['state'].aux['agg']['delta']
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(delta)) > 0  # FLoRA folded rounds
    want = lora_aggregation.apply_delta(run['backbone']['params'], delta)
    chex.assert_trees_all_close(run['frozen']['params'], want)
    _, rows, summary = personal_exp.run_personalize(spec, 1, run)
    assert rows and np.isfinite(summary['mean_global'])


def test_export_refuses_a_plain_adapter_and_merges_the_delta(stack_run, tmp_path, monkeypatch):
    config, workdir = stack_run
    with pytest.raises(ValueError, match='--merged') as err:
        export.export(workdir, str(tmp_path / 'peft'))
    assert '\n' not in str(err.value) and "fed.lora_aggregation='stack'" in str(err.value)
    seen = {}
    monkeypatch.setattr(peft, 'export_merged',
                        lambda out, arch, cfg, params, tree, alpha: seen.update(params=params))
    export.export(workdir, str(tmp_path / 'merged'), merged=True)
    run = personal_exp.restore(translate.spec(config), workdir)
    chex.assert_trees_all_close(seen['params'], run['frozen']['params'], atol=1e-6)
