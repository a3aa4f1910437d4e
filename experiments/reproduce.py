"""One command that regenerates the reproduction report of FedGen-Edge's six claims.

    python -m experiments.reproduce --scale smoke --workdir runs/reproduce_smoke  # minutes
    python -m experiments.reproduce --scale cpu --workdir runs/reproduce  # at most 3 h, 2 cores
    python -m experiments.reproduce --scale cpu --workdir runs/reproduce --tune  # + the grids
    python -m experiments.reproduce --scale gpu --workdir runs/reproduce_gpu  # paper-like

Writes REPORT.md and its PNG figures into --out (default docs/results for cpu/gpu,
<workdir>/report for smoke, so a smoke run never overwrites the checked-in report) and every
measured number into <workdir>/results.json. experiments/scales.py defines the scales (and
writes their description), experiments/lm_study.py runs a language-model study (the main one:
claims 1, 2, 4, 5 and 6; a second, smaller one beside it), experiments/claims.py holds the claim
rules, experiments/report.py the markdown and the figures. This module adds:

- CIFAR-10 (Fig. 4, claim 3): FedGen-Edge and full FedAvg, one seed, fd_classifier (not FID).
- Fashion-MNIST (experiments/image_study.py): the pre-trained image generator, claim 3 when
  CIFAR-10 is not run, and the personalized generators' own-class shares.
- Brown (when the scale says so, configs/brown_fedgen_edge.py and its corpus exist): both
  methods, seed 0, at the second study's variant and overrides.

Resume and reuse: every run lives in its own directory under --workdir with the exact config it
was given. A run whose summary.json exists with the same config is read back
(writers.finished), and a partial run or sweep group resumes from its checkpoints. A killed
reproduce, rerun, picks up where it stopped.
"""
import json
import os
import time

import jax
from absl import flags

from configs import cifar10_fedgen_edge
from experiments import compare, image_study, lm_study, report, smoke_data
from experiments.console import log, run_main
from experiments.lm_study import single
from experiments.scales import SCALES


def cifar_section(sc: dict, workdir: str, images: str) -> dict:
    """FedGen-Edge then full FedAvg on CIFAR-10-style data, sharing one backbone/classifier."""
    if sc['cifar'] is None:
        return {'skipped': 'not run at this scale'}
    wd = os.path.join(workdir, 'cifar10')
    over = {**sc['cifar'], 'metrics.cache_dir': os.path.abspath(wd)}
    if images:
        over['data.source'] = images
    elif not os.path.exists(cifar10_fedgen_edge.SHARED_CIFAR):
        return {'skipped': f'{cifar10_fedgen_edge.SHARED_CIFAR} not found'}
    out = {}
    for m in ('fedgen_edge', 'fedavg_full'):
        c = compare.method_config('cifar10', m, sc['cifar_arg'], over)
        out[m] = single(c, os.path.join(wd, m))
        if 'pretrain.backbone_path' not in over:  # every later run loads the same weights
            cache = os.path.join(wd, m, 'backbone')
            over['pretrain.backbone_path'] = os.path.join(cache, sorted(os.listdir(cache))[0])
    return out


def brown_section(sc: dict, workdir: str) -> dict:
    """Brown corpus, FedGen-Edge vs full FedAvg (seed 0), when its config and corpus exist."""
    if not sc['brown'] or not sc['small_gpt']:
        return {'skipped': 'not run at this scale'}
    try:
        from configs import brown_fedgen_edge
    except ImportError:
        return {'skipped': 'configs/brown_fedgen_edge.py does not exist'}
    out, over = {}, dict(sc['small_gpt']['over'])
    try:
        for m, lr in (('fedgen_edge', None), ('fedavg_full', 1e-3)):
            c = brown_fedgen_edge.get_config(sc['small_gpt']['arg'])
            for k, v in {
                    **over,
                    **({
                        'fed.algorithm': m,
                        'fed.client_lr': lr
                    } if lr else {})
            }.items():
                compare.set_field(c, k, v)
            out[m] = single(c, os.path.join(workdir, 'brown', m))
            if 'pretrain.backbone_path' not in over:
                cache = os.path.join(workdir, 'brown', m, 'backbone')
                over['pretrain.backbone_path'] = os.path.join(cache, sorted(os.listdir(cache))[0])
    except (ValueError, OSError) as e:  # e.g. the corpus is not installed
        return {'skipped': f'failed: {str(e)[:200]}'}
    return out


def run(scale: str,
        workdir: str,
        out: str | None = None,
        command: str = '',
        tune: bool = False) -> dict:
    """Runs (or reuses) every experiment of ``scale`` and writes the report; returns results.
    ``tune`` also runs the grids that chose the scale's pinned settings (the client lrs of
    ``pinned_lrs`` and the Fashion-MNIST personalization budget); without it their finished
    runs are read back and shown, and nothing of theirs is computed."""
    if scale not in SCALES:
        raise ValueError(f'--scale must be one of {list(SCALES)}, got {scale!r}')
    sc, t0 = SCALES[scale], time.time()
    command = command or f'python -m experiments.reproduce --scale {scale} --workdir {workdir}'
    out = out or (os.path.join(workdir, 'report') if scale == 'smoke' else os.path.join(
        'docs', 'results'))
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    corpus = images = fashion = ''
    if sc['synthetic_data']:
        fashion = smoke_data.write_fashion_idx(
            os.path.abspath(os.path.join(workdir, 'data', 'fmnist')))
        corpus = smoke_data.write_corpus(os.path.abspath(os.path.join(workdir, 'data', 'ptb')))
        images = os.path.join(workdir, 'data', 'images')
        if not os.path.isdir(images):
            smoke_data.write_images(images)
        images = os.path.abspath(images)
    results = {'ptb': lm_study.section(sc['ptb'], workdir, corpus, tune)}
    if sc['small_gpt']:
        results['small_gpt'] = lm_study.section(sc['small_gpt'], workdir, corpus, tune)
    results['cifar10'] = cifar_section(sc, workdir, images)
    results['brown'] = brown_section(sc, workdir)
    results['fmnist'] = image_study.section(sc.get('fmnist'), workdir, out, fashion, command, tune)
    results.update(scale=scale,
                   settings={
                       k: v
                       for k, v in sc.items()
                   },
                   wall_s=round(time.time() - t0, 1),
                   tuned=tune,
                   command=command)
    measured = report.write(results, out)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(measured, f, indent=1, default=str)
    log(f'wrote {out}/REPORT.md ({time.time() - t0:.0f} s)')
    return measured


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_enum('scale', 'smoke', list(SCALES), 'Experiment scale.')
    flags.DEFINE_string('workdir', 'runs/reproduce', 'Parent directory of every run.')
    flags.DEFINE_string('out', None, 'Report directory (default: see the module docstring).')
    flags.DEFINE_bool('tune', False, 'Also run the grids that chose the scale\'s pinned settings.')


def main(argv):
    del argv
    f = flags.FLAGS
    if not jax.config.jax_compilation_cache_dir:  # many runs compile the same programs
        jax.config.update('jax_compilation_cache_dir', os.path.join(f.workdir, 'xla_cache'))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    cmd = f'python -m experiments.reproduce --scale {f.scale} --workdir {f.workdir}'
    cmd += (f' --out {f.out}' if f.out else '') + (' --tune' if f.tune else '')
    run(f.scale, f.workdir, f.out, cmd, f.tune)


if __name__ == '__main__':
    define_flags()
    run_main(main)
