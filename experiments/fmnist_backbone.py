"""Pre-trains (once, cached) the Fashion-MNIST DDPM backbone and measures whether its samples
are recognisable garments.

    apt-get install -y dataset-fashion-mnist
    python -m experiments.fmnist_backbone --workdir runs/fmnist_backbone --out docs/results

The backbone is configs/fmnist_fedgen_edge.py's U-Net, pre-trained on the server's public portion
(a seeded data.public_fraction of the train images) by experiments.backbones.pretrained, the same
code and cache as every training run: <workdir>/backbone/<recipe hash>. A later run reuses it
with ``--config.pretrain.backbone_path=<that path>`` (or the same workdir and recipe); a second
invocation of this command reads it back instead of training.

Quality, in the features of the project's small classifier (fedgen/metrics/classifier.py, trained
on the train images and cached under <workdir>/classifier/<recipe hash>):
    FD(gen)   = Fréchet distance between N DDIM samples and N real test images (set A);
    FD(floor) = the same distance between set A and a disjoint set B of N real test images;
    ratio     = FD(gen) / FD(floor)   (1 = as close to A as other real images are).
This is 'FD (classifier features)', not FID. Also: the classifier's mean max-softmax on the
samples and on set B (how confidently they read as some garment) and the total-variation
distance of the samples' predicted-class histogram from uniform. Writes <out>/fmnist_backbone.md
and <out>/fmnist_backbone_samples.png (the first 100 samples).
"""
import os
import time

import jax
import numpy as np
from absl import flags

from configs import fmnist_fedgen_edge
from experiments import backbones, bench_round, compare
from experiments import translate
from experiments.console import log, run_main
from fedgen.models import diffusion
from fedgen.metrics import plots
from fedgen.metrics import classifier, frechet
from fedgen.models import unet
from fedgen.tasks import cifar10, image_generation


def config_for(steps: int,
               batch_size: int,
               lr: float,
               ema_decay: float = 0.0,
               arg: str = '',
               over: dict | None = None):
    """configs/fmnist_fedgen_edge.py:``arg`` with the dotted ``over`` and the pre-training
    overridden."""
    c = fmnist_fedgen_edge.get_config(arg)
    pre = {'steps': steps, 'batch_size': batch_size, 'lr': lr, 'ema_decay': ema_decay}
    for k, v in {**(over or {}), **{f'pretrain.{k}': v for k, v in pre.items()}}.items():
        compare.set_field(c, k, v)
    return c


def real_sets(test_images: np.ndarray, n: int, seed: int) -> tuple:
    """Two disjoint sets A, B of ``n`` test images each (a seeded permutation)."""
    if not 1 <= n <= len(test_images) // 2:
        raise ValueError(f'--samples must be in [1, {len(test_images) // 2}] (two disjoint sets '
                         f'of the {len(test_images)} test images), got {n}')
    order = np.random.default_rng([seed, 0xFD]).permutation(len(test_images))
    return test_images[order[:n]], test_images[order[n:2 * n]]


def quality(clf: dict, fake: np.ndarray, real_a: np.ndarray, real_b: np.ndarray) -> dict:
    """FD (classifier features) of fake vs A, the floor B vs A, their ratio, and confidences."""
    feats = {
        k: classifier.features(clf, x)
        for k, x in (('a', real_a), ('b', real_b), ('fake', fake))
    }
    st = {k: frechet.gaussian_stats(v) for k, v in feats.items()}
    fd_gen = frechet.frechet_distance(*st['a'], *st['fake'])
    floor = frechet.frechet_distance(*st['a'], *st['b'])
    probs = {
        k: jax.nn.softmax(classifier.logits(clf, x), -1)
        for k, x in (('fake', fake), ('b', real_b))
    }
    k = probs['fake'].shape[-1]
    hist = np.bincount(np.asarray(probs['fake'].argmax(-1)), minlength=k) / len(fake)
    return {
        'fd_gen': fd_gen,
        'fd_floor': floor,
        'ratio': fd_gen / floor,
        'conf_gen': float(probs['fake'].max(-1).mean()),
        'conf_real': float(probs['b'].max(-1).mean()),
        'class_tv': float(0.5 * np.abs(hist - 1.0 / k).sum()),
        'class_hist': hist.round(3).tolist()
    }


def draw(spec, params: dict, n: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """``n`` DDIM samples (``steps`` steps, eta 0) of the backbone, uint8 [n, 32, 32, 3]. The
    sampler is built here so its step count stays out of the backbone's recipe."""
    s = spec.settings
    model = unet.UNet(cifar10.model_config(s))
    sched = diffusion.make_schedule(s.diffusion.schedule, s.diffusion.timesteps)
    sampler = image_generation.make_sampler(model, sched, batch, steps, 0.0)
    return image_generation.draw(sampler, {'params': params}, jax.random.PRNGKey(seed + 31), n,
                                 batch)


def run(workdir: str,
        out: str,
        steps: int,
        batch_size: int,
        lr: float,
        n: int,
        sample_steps: int,
        command: str,
        ema_decay: float = 0.0,
        arg: str = '',
        over: dict | None = None) -> dict:
    """Pre-trains or loads the backbone, samples, scores and writes the markdown and grid; the
    config is :func:`config_for`'s (``arg``, ``over``: e.g. another data.source)."""
    spec = translate.spec(config_for(steps, batch_size, lr, ema_decay, arg, over))
    t0 = time.time()
    task = spec.prepare_task()
    params, info = backbones.pretrained(spec, task, workdir, jax.random.PRNGKey(spec.seed))
    t_pre = time.time() - t0
    log(f'backbone: {info["source"]} ({t_pre:.0f} s, loss {info.get("pretrain_loss", "cached")})')
    t1 = time.time()
    clf = backbones.auxiliaries(spec, task, workdir)['classifier']
    t_clf = time.time() - t1
    real_a, real_b = real_sets(task.test['images'], n, spec.seed)
    t2 = time.time()
    fake = draw(spec, params, n, sample_steps, min(n, 250), spec.seed)
    t_draw = time.time() - t2
    q = quality(clf, fake, real_a, real_b)
    acc = classifier.accuracy(clf, task.test['images'], task.test['labels'])
    os.makedirs(out, exist_ok=True)
    png = 'fmnist_backbone_samples.png'
    plots.image_grid(fake[:100], os.path.join(out, png), cols=10)
    res = dict(q,
               source=info['source'],
               pretrain_s=info.get('pretrain_s'),
               pretrain_loss=info.get('pretrain_loss'),
               load_s=round(t_pre, 1),
               classifier_s=round(t_clf, 1),
               sample_s=round(t_draw, 1),
               classifier_test_acc=acc,
               public_images=len(task.public['labels']),
               n=n,
               sample_steps=sample_steps,
               steps=steps,
               batch_size=batch_size,
               lr=lr,
               ema_decay=ema_decay,
               load=os.getloadavg(),
               classes=list(task.classes),
               command=command)
    with open(os.path.join(out, 'fmnist_backbone.md'), 'w') as f:
        f.write(markdown(spec.settings, res, png))
    log(f'FD (classifier features) {q["fd_gen"]:.3f}, floor {q["fd_floor"]:.3f}, ratio '
        f'{q["ratio"]:.2f}; wrote {out}/fmnist_backbone.md')
    return res


def markdown(settings, r: dict, png: str) -> str:
    """The results page (generated) from the task's settings and the results ``r``."""
    m, dif = settings.model, settings.diffusion
    hist = ', '.join(f'{c} {h:.2f}' for c, h in zip(r['classes'], r['class_hist']))
    loss = 'n/a (cached)' if r['pretrain_loss'] is None else f'{r["pretrain_loss"]:.4f}'
    ema = (f"; the backbone is the weights' EMA over the steps (decay {r['ema_decay']:g}, warm-up "
           'min(d, (1 + s) / (10 + s)))' if r.get('ema_decay') else '')
    trained = (f'pre-trained here in {r["pretrain_s"]:.0f} s' if r['pretrain_s'] is not None else
               'read back from the cache (the pre-training time is in the first invocation)')
    return '\n'.join([
        f'<!-- generated by: {r["command"]}; do not edit -->', '# Fashion-MNIST DDPM backbone', '',
        f'Machine: {bench_round.machine()}; load average at the end {r["load"][0]:.2f} '
        f'(1 min) / {r["load"][1]:.2f} (5 min) / {r["load"][2]:.2f} (15 min).', '',
        f'Backbone: configs/fmnist_fedgen_edge.py U-Net ({m.channels} channels, mult '
        f'{tuple(m.channel_mult)}, {m.num_res_blocks} residual block(s) per level, attention at '
        f'{tuple(m.attn_resolutions)}), {dif.schedule} schedule, T = '
        f'{dif.timesteps}; {r["steps"]} Adam steps of {r["batch_size"]} images at '
        f'lr {r["lr"]:g} on the {r["public_images"]} public train images (random flips){ema}, '
        f'{trained}; mean loss of the last 100 steps {loss}. '
        f'Cached at `{shown_path(r["source"])}`; reuse it with '
        '`--config.pretrain.backbone_path=<that path>`.', '',
        f'Samples: {r["n"]} DDIM samples ({r["sample_steps"]} steps, eta 0) in '
        f'{r["sample_s"]:.0f} s. Classifier (FD features): test accuracy '
        f'{100 * r["classifier_test_acc"]:.1f}%, {r["classifier_s"]:.0f} s to build or load.', '',
        '| quantity | value |', '|---|---|',
        f'| FD (classifier features), samples vs real set A (n = {r["n"]} each) | '
        f'{r["fd_gen"]:.4g} |',
        f'| floor: real set B vs real set A (disjoint, n = {r["n"]} each) | {r["fd_floor"]:.4g} |',
        f'| ratio FD / floor | {r["ratio"]:.3g} |',
        f'| classifier mean max-softmax: samples / real set B | {r["conf_gen"]:.3f} / '
        f'{r["conf_real"]:.3f} |',
        f'| TV(predicted-class histogram of samples, uniform) | {r["class_tv"]:.3f} |', '',
        f'Predicted classes of the samples: {hist}.', '',
        'FD (classifier features) is the Fréchet distance in the 64-d features of a small CNN '
        'trained here (fedgen/metrics/classifier.py), not FID; it is not comparable to '
        'published numbers. The floor is what sampling noise alone gives at this n.', '',
        f'![samples]({png})', ''
    ])


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as given."""
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def define_flags() -> None:
    flags.DEFINE_string('workdir', 'runs/fmnist_backbone', 'Backbone and classifier cache.')
    flags.DEFINE_string('out', 'docs/results', 'Where fmnist_backbone.md and the PNG go.')
    flags.DEFINE_integer('steps', 3000, 'Pre-training steps (pretrain.steps).')
    flags.DEFINE_integer('batch_size', 32, 'Pre-training batch (pretrain.batch_size).')
    flags.DEFINE_float('lr', 1e-3, 'Pre-training Adam learning rate (pretrain.lr).')
    flags.DEFINE_float('ema_decay', 0.0, "> 0: the backbone is the weights' EMA "
                       '(pretrain.ema_decay).')
    flags.DEFINE_integer('samples', 1000, 'Samples, and the size of each real set.')
    flags.DEFINE_integer('sample_steps', 50, 'DDIM steps per sample.')


def main(argv):
    del argv
    f = flags.FLAGS
    cmd = (f'python -m experiments.fmnist_backbone --workdir {f.workdir} --out {f.out} '
           f'--steps {f.steps} --batch_size {f.batch_size} --lr {f.lr:g} --samples {f.samples} '
           f'--sample_steps {f.sample_steps}' +
           (f' --ema_decay {f.ema_decay:g}' if f.ema_decay else ''))
    run(f.workdir, f.out, f.steps, f.batch_size, f.lr, f.samples, f.sample_steps, cmd, f.ema_decay)


if __name__ == '__main__':
    define_flags()
    run_main(main)
