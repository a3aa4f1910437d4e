"""Exports a run's LoRA adapter in Hugging Face PEFT format, or the merged full weights.

    python -m experiments.export --workdir runs/smollm2 --out runs/smollm2/peft
    python -m experiments.export --workdir runs/smollm2 --out DIR --client 7   # client 7's own
    python -m experiments.export --workdir runs/smollm2 --out DIR --merged     # W0 + (alpha/r) AB

Reads <workdir>/config.json and the newest (or --step) server state in <workdir>/checkpoints; the
global adapter is state.trainable['lora']. --client K takes row K of the stacked personal trees that
experiments.personalize saved under <workdir>/personal/<step>. The backbone comes from
model.source ('local': the run's cached pre-trained backbone under <workdir>/backbone, or
pretrain.backbone_path). Writes adapter_config.json + adapter_model.safetensors (PEFT), or
config.json + model.safetensors (--merged, Hugging Face PyTorch layout, float32), readable by
everyone (mode 0644 under the usual umask 022) like any file the run writes.

Quiet: absl logging stays at WARNING unless --verbosity is given (set before jax initialises a
backend, so its platform probe logs nothing), and a bad --workdir, --client or --step is one
``error: ...`` line with exit status 2 (experiments.console).
"""
import os

import jax
import numpy as np
from absl import flags

from fedgen.io import checkpoint
from fedgen.aggregators import lora_math as lora_aggregation
from fedgen.lora import peft
from fedgen.models import gpt, llama
from fedgen.io import weights
from experiments import translate, writers
from experiments.console import run_main
from experiments.runspec import RunSpec

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program (tests import the module)."""
    flags.DEFINE_string('workdir', None, 'The run directory (config.json, checkpoints/).')
    flags.DEFINE_string('out', None, 'Output directory.')
    flags.DEFINE_integer('client', -1, 'Export client K\'s personal adapter (-1: global).')
    flags.DEFINE_bool('merged', False, 'Write merged full weights instead of an adapter.')
    flags.DEFINE_integer('step', 0, 'Checkpoint / personalization round (0: the newest).')


HUB_NAMES = {'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M-Instruct'}


def _local_backbone(spec: RunSpec, workdir: str) -> dict:
    path = spec.settings.pretrain.backbone_path
    if not path:
        root = os.path.join(workdir, 'backbone')
        dirs = sorted(
            (os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else [],
            key=os.path.getmtime)
        if not dirs:
            raise ValueError(f'--workdir: no pre-trained backbone under {root}')
        path = dirs[-1]
    return checkpoint.load_tree(path, None, 'backbone')


def backbone(spec: RunSpec, workdir: str) -> tuple[str, object, dict, str]:
    """(arch, model config, float params, base model name) of the run's frozen backbone."""
    m, alpha = spec.settings.model, spec.method.lora.alpha
    source = m.source
    if source != 'local':
        bb = weights.load(source, lora_alpha=alpha, field='model.source')
        return bb.arch, bb.config, bb.params, HUB_NAMES.get(source, source.partition(':')[2])
    params = _local_backbone(spec, workdir)
    if m.name == 'gpt':  # fedgen's GPT is the GPT-2 architecture
        cfg = gpt.GPTConfig(vocab_size=params['wte']['embedding'].shape[0],
                            n_positions=params['wpe']['embedding'].shape[0],
                            n_embd=params['wte']['embedding'].shape[1],
                            n_layer=jax.tree.leaves(params['h'])[0].shape[0],
                            n_head=m.n_head,
                            lora_alpha=alpha)
        return 'gpt2', cfg, params, ''
    fields = {
        f: getattr(m, f)  # the run's model fields
        for f in ('n_positions', 'n_head', 'n_kv_head', 'n_inner', 'rope_theta', 'rms_norm_eps',
                  'tie_word_embeddings')
    }
    emb = params['embed_tokens']['embedding']
    cfg = llama.LlamaConfig(vocab_size=emb.shape[0],
                            n_embd=emb.shape[1],
                            n_layer=jax.tree.leaves(params['layers'])[0].shape[0],
                            lora_alpha=alpha,
                            **fields)
    return 'llama', cfg, params, ''


def adapters(spec: RunSpec, workdir: str, client: int, step: int) -> tuple[dict, int]:
    """(one adapter tree, its round): the global one, or row ``client`` of the personal trees."""
    if client < 0:
        mngr = checkpoint.manager(workdir, spec.schedule.keep)
        step = step or checkpoint.latest(mngr)
        if not step:
            raise ValueError(f'--workdir: no checkpoint under {workdir}/checkpoints')
        state = checkpoint.restore(mngr, step, state=None)['state']
        return state['trainable']['lora'], step
    root = os.path.join(os.path.abspath(workdir), 'personal')
    rounds = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not rounds:
        raise ValueError(f'--client: no personal trees under {root} (run experiments.personalize)')
    step = step or rounds[-1]
    personal = checkpoint.load_personal(workdir, step, None)
    tree = personal.get('lora', personal)
    n = jax.tree.leaves(tree)[0].shape[0]
    if not 0 <= client < n:
        raise ValueError(f'--client must be in [0, {n}), got {client}')
    return jax.tree.map(lambda x: np.asarray(x[client]), tree), step


def frozen_delta(spec: RunSpec, workdir: str, step: int) -> dict | None:
    """The server-side frozen delta dW of a FedEx-LoRA / FLoRA run at round ``step`` (the model
    it trained is W0 + dW + s A B), or None for runs without one."""
    if spec.lora_aggregation not in lora_aggregation.WITH_DELTA:
        return None
    mngr = checkpoint.manager(workdir, spec.schedule.keep)
    state = checkpoint.restore(mngr, step, state=None)['state']
    return state['aux']['agg']['delta']


def readable(out: str) -> None:
    """Gives the files in ``out`` the mode a plain ``open`` would (0666 less the umask): the
    safetensors writer's temporary file + rename leaves 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(out) if os.path.isdir(out) else ():
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)


def export(workdir: str, out: str, client: int = -1, merged: bool = False, step: int = 0) -> str:
    """Writes the export into ``out``; returns a one-line description."""
    spec = translate.spec(writers.run_config(workdir))  # the run's own config, translated once
    method = spec.lora_aggregation
    if method in lora_aggregation.WITH_DELTA and not merged:
        raise ValueError(f'fed.lora_aggregation={method!r} trains W0 + dW + s A B with a '
                         'server-side frozen delta dW that a PEFT adapter cannot carry; export '
                         'the merged weights with --merged')
    arch, cfg, params, base = backbone(spec, workdir)
    tree, step = adapters(spec, workdir, client, step)
    delta = frozen_delta(spec, workdir, step)
    if delta is not None:  # the model the run trained: W0 + dW, then the adapter merged on top
        params = lora_aggregation.apply_delta(params, jax.tree.map(np.asarray, delta))
    alpha = spec.method.lora.alpha
    who = 'global' if client < 0 else f'client {client}'
    if merged:
        peft.export_merged(out, arch, cfg, params, tree, alpha)
        readable(out)
        return f'merged {arch} weights ({who} adapter, round {step}) -> {out}'
    pc = peft.export_adapter(out, arch, params, tree, alpha, base)
    readable(out)
    return (f'PEFT LoRA ({who}, round {step}; r={pc["r"]}, alpha={pc["lora_alpha"]}, '
            f'targets {pc["target_modules"]}) -> {out}')


def main(argv):
    del argv
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.client, FLAGS.merged, FLAGS.step))


if __name__ == '__main__':
    define_flags()
    flags.mark_flags_as_required(['workdir', 'out'])
    run_main(main)
