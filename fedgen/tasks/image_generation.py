"""Sampling and generation metrics of the image-diffusion task (:mod:`fedgen.tasks.cifar10`).

A task's sampler is one jitted DDIM loop of fixed batch shape; samples leave it as uint8
[N, 32, 32, 3] (a one-channel model's repeated over R, G and B). Below, ``task`` is the task's
``Parts`` (its ``sampler``, ``class_names`` and splits) and ``settings`` its ``Settings``.
Metrics on uint8 samples: ``fd_classifier`` (Fréchet distance in the task's small CNN
classifier's features; not FID), ``gen_conf`` (the classifier's mean max-softmax),
``gen_class_tv`` (total variation between the samples' predicted-class histogram and a target
histogram) and, with Inception weights, ``fid``.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedgen.data import batching, images
from fedgen.metrics import classifier, dataset_loss
from fedgen.models import diffusion, unet


def make_sampler(model: unet.UNet,
                 schedule: diffusion.Schedule,
                 batch: int,
                 steps: int,
                 eta: float = 0.0) -> Callable:
    """One jitted DDIM sampler of a fixed batch shape [batch, H, W, C] (the model's image size and
    channels), so every call reuses one compilation."""
    cfg = model.config

    @jax.jit
    def sample(variables, key):
        eps_fn = lambda x, t: model.apply(variables, x, t)
        shape = (batch, cfg.image_size, cfg.image_size, cfg.image_channels)
        return diffusion.ddim_sample(eps_fn, schedule, shape, key, steps, eta)

    return sample


def draw(sampler: Callable, variables: dict, rng, num: int, batch: int) -> np.ndarray:
    """``num`` samples of ``sampler`` (ceil(num / batch) calls of ``batch``, keys fold_in(rng, i))
    as uint8 [num, 32, 32, 3]; a one-channel model's samples are repeated over R, G and B, as its
    data was."""
    out = [
        np.asarray(sampler(variables, jax.random.fold_in(rng, i))) for i in range(-(-num // batch))
    ]
    x = images.to_uint8(np.concatenate(out)[:num])
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def sample_images(task, settings, variables: dict, rng, num: int) -> np.ndarray:
    """``num`` DDIM samples (diffusion.sample_steps steps) as uint8 [num, 32, 32, 3]."""
    return draw(task.sampler, variables, rng, num, settings.eval.sample_batch)


def generation_metrics(clf: dict, real_stats, fake: np.ndarray, target: np.ndarray) -> dict:
    """fd_classifier, gen_conf and gen_class_tv of uint8 samples against a target histogram."""
    probs = jax.nn.softmax(jnp.asarray(classifier.logits(clf, fake)), -1)
    hist = np.bincount(np.asarray(probs.argmax(-1)), minlength=len(target)) / len(fake)
    return {
        'fd_classifier': classifier.fd_classifier(clf, real_stats, fake),
        'gen_conf': float(probs.max(-1).mean()),
        'gen_class_tv': float(0.5 * np.abs(hist - target / target.sum()).sum())
    }


def evaluator(task, settings, split: str = 'valid', aux: dict | None = None):
    """evaluate(variables) -> {'eps_mse', with aux['classifier']: 'fd_classifier', 'gen_conf',
    'gen_class_tv', and with aux['inception']: 'fid'}.

    aux: {'classifier': params, 'inception': InceptionV3 variables} (loaded by the caller). The
    reference feature statistics of both networks are computed here once, over the whole split;
    each evaluation draws eval.fd_samples DDIM samples and scores the same samples with both.
    """
    from fedgen.metrics import fid

    data = getattr(task, split)
    n = min(settings.eval.loss_images, len(data['labels']))
    batches = batching.batch_all({'images': data['images'][:n]}, settings.eval.batch_size)
    key = jax.random.PRNGKey(settings.seed + 17)  # the same noise every evaluation
    loss = jax.jit(lambda v: dataset_loss.dataset_loss(task.eval_loss_fn, v, batches, key)[0])
    clf, inc = (aux or {}).get('classifier'), (aux or {}).get('inception')
    real = classifier.feature_stats(clf, data['images']) if clf is not None else None
    if inc is not None:
        inc = jax.device_put(inc)  # ~95 MB: moved once, not at every batch
        real_inc = fid.inception_stats(inc, data['images'])
    uniform = np.ones(len(task.class_names))

    def evaluate(variables) -> dict:
        out = {f'{split}_eps_mse': float(loss(variables))}
        if clf is None and inc is None:
            return out
        fake = sample_images(task, settings, variables, jax.random.PRNGKey(settings.seed + 29),
                             settings.eval.fd_samples)
        if clf is not None:
            out.update(generation_metrics(clf, real, fake, uniform))
        if inc is not None:
            out['fid'] = fid.fid(inc, real_inc, fake)
        return out

    return evaluate


def samples(task, settings, variables: dict, rng) -> np.ndarray:
    """eval.num_samples images for the sample grid, uint8 [n, 32, 32, 3]."""
    return sample_images(task, settings, variables, rng, settings.eval.num_samples)
