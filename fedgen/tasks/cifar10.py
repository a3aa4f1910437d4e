"""The CIFAR-10 image-generation task: a DDPM epsilon-prediction U-Net, data, loss and metrics.

Data flow. CIFAR-10 train images (any loader of :mod:`fedgen.data.images`, path in
``data.source``) are shuffled with the seed; the first ``data.public_fraction`` is the server's
public portion, used only to pre-train the backbone; the next ``data.valid_fraction`` is the
held-out validation split (per-round metrics); the rest is the client pool, split over clients
with label skew (or k classes per client), and each client's images into local train/test parts.
The CIFAR-10 test split is used once, for the final numbers. Metrics on a split:

- ``eps_mse``: the epsilon-MSE of the model on ``eval.loss_images`` split images (fixed noise);
- ``fd_classifier``: the Fréchet distance between the features of ``eval.fd_samples`` DDIM samples
  and of all the split's images, in a small CNN classifier trained on the public and pool
  images. It is *not*
  FID; with Inception weights given (``metrics.inception_path``) ``fid`` is reported as well;
- ``gen_conf``: the classifier's mean max-softmax on samples (how recognisable they are), and
  ``gen_class_tv``: total-variation distance between the samples' predicted-class histogram and the
  target label histogram (uniform for the global model; the client's own for personal models).
"""
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedgen import tasks
from fedgen.tasks import image_generation
from fedgen.models import diffusion
from fedgen.algorithms import LoraSpec
from fedgen.data import images, partition
from fedgen.metrics import classifier
from fedgen.models import unet

PARTITIONS = ('dirichlet_label', 'dirichlet_client', 'k_classes', 'quantity', 'iid')
METRIC = 'fd_classifier'  # headline metric (lower is better)


class Parts(NamedTuple):
    """The task's internals that its evaluator and sampler read."""
    model: unet.UNet
    model_cfg: unet.UNetConfig
    schedule: diffusion.Schedule
    loss_fn: Callable  # training: flips (data.flip) and dropout (model.dropout) when enabled
    eval_loss_fn: Callable  # evaluation: neither (deterministic given its rng)
    pool: dict  # {'images': uint8 [M, 32, 32, 3], 'labels': int32 [M]}
    client_train: list
    client_test: list
    public: dict
    valid: dict  # held out from CIFAR-10 train (data.valid_fraction)
    test: dict  # the CIFAR-10 test split
    labels: np.ndarray  # [M] pool labels
    class_names: tuple
    sampler: Callable  # jitted (variables, rng) -> float [eval.sample_batch, 32, 32, 3]


# Key streams of the training loss besides t and eps (which use the step's rng itself, so they
# do not change when flips or dropout are turned on).
FLIP_STREAM = 0xF11B
DROPOUT_STREAM = 0xD20B


def denoising_loss(model: unet.UNet,
                   schedule: diffusion.Schedule,
                   flip: bool = False,
                   train: bool = False) -> Callable:
    """Masked epsilon-MSE: batch['images'] uint8 [B, 32, 32, 3], batch['weight'] [B].

    The model sees x0 = images[..., :C] / 127.5 - 1 with C = model.config.image_channels (3; or
    1 for grayscale data, whose three channels are equal).

    L = sum_b w_b ||eps_theta(x_t, t) - eps||^2 / (D sum_b w_b), with t ~ U{0..T-1} and
    eps ~ N(0, I) drawn from the step's rng; the weight returned is sum_b w_b (images).
    With ``train``: ``flip`` mirrors each image left-right with probability 1/2
    (images.random_flip, key fold_in(rng, FLIP_STREAM)), and the U-Net's dropout
    (model.dropout > 0) draws from fold_in(rng, DROPOUT_STREAM). The step's rng comes from
    (seed, round, client, step), so both are reproducible and a resumed run is exact.
    """
    flip = flip and train
    channels = model.config.image_channels
    kw = {'train': True} if train and model.config.dropout > 0 else None

    def loss_fn(variables, batch, rng):
        if flip:
            batch = {
                **batch, 'images':
                images.random_flip(batch['images'], jax.random.fold_in(rng, FLIP_STREAM))[0]
            }
        x0 = batch['images'][..., :channels].astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        if kw is None:
            eps_fn = lambda x, t: model.apply(variables, x, t)
        else:
            drop = {'dropout': jax.random.fold_in(rng, DROPOUT_STREAM)}
            eps_fn = lambda x, t: model.apply(variables, x, t, rngs=drop, **kw)
        per = diffusion.eps_loss_terms(eps_fn, schedule, x0, rng)
        w = batch['weight'].astype(jnp.float32)
        return (per * w).sum() / jnp.maximum(w.sum(), 1.0), w.sum()

    return loss_fn


@dataclasses.dataclass(frozen=True)
class Data:
    """data.*: image source (any fedgen.data.images layout), per-class limits (0 = all), the
    public and validation shares of train, the client partition, and random horizontal flips of
    training images (pre-training and clients; never evaluation)."""
    source: str
    limit_per_class: int
    test_limit_per_class: int
    public_fraction: float
    valid_fraction: float
    partition: tasks.Partition
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class Model:
    """model.*: the U-Net (fedgen.models.unet.UNetConfig fields)."""
    channels: int
    channel_mult: tuple
    num_res_blocks: int
    attn_resolutions: tuple
    num_heads: int
    groups: int
    conv_impl: str
    dropout: float = 0.0
    image_channels: int = 3  # 1: grayscale data (R = G = B) diffused as one channel


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """diffusion.*: noise schedule ('linear' | 'cosine'), T, DDIM sampling steps and eta."""
    schedule: str
    timesteps: int
    sample_steps: int
    ddim_eta: float


@dataclasses.dataclass(frozen=True)
class Eval:
    """eval.*: eps-MSE images, Fréchet samples, sampler batch, grid size."""
    every: int
    batch_size: int
    loss_images: int
    fd_samples: int
    sample_batch: int
    num_samples: int
    samples_every_eval: bool


@dataclasses.dataclass(frozen=True)
class Classifier:
    """metrics.classifier.*: the fd_classifier CNN's training."""
    steps: int
    batch_size: int
    lr: float
    feature_dim: int
    widths: tuple


@dataclasses.dataclass(frozen=True)
class Metrics:
    """metrics.*: Inception weights for FID ('' = none), cache dir, the fd_classifier."""
    inception_path: str
    cache_dir: str
    classifier: Classifier


@dataclasses.dataclass(frozen=True)
class Settings:
    """The CIFAR-10 task's typed hyper-parameters (sections mirror the config's)."""
    seed: int
    data: Data
    model: Model
    diffusion: Diffusion
    lora: LoraSpec
    fed: tasks.Population
    eval: Eval
    metrics: Metrics
    pretrain: tasks.Pretrain


def validate(settings: Settings) -> None:
    """One-line ValueErrors for the data/fed fields this task reads, before any loading."""
    tasks.validate_split(settings, PARTITIONS)
    eta = settings.diffusion.ddim_eta
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f'diffusion.ddim_eta must be a number >= 0, got {eta!r}')
    v = settings.data.valid_fraction
    if not 0.0 < v < 1.0 - settings.data.public_fraction:
        raise ValueError(f'data.valid_fraction must be in (0, 1 - data.public_fraction), got {v}')
    if not isinstance(settings.data.flip, bool):
        raise ValueError(f'data.flip must be True or False, got {settings.data.flip!r}')
    for name in ('limit_per_class', 'test_limit_per_class'):  # 0: every image
        if not (isinstance(n := getattr(settings.data, name), int) and n >= 0):
            raise ValueError(f'data.{name} must be an int >= 0 (0: all), got {n!r}')
    if settings.model.image_channels not in (1, 3):
        raise ValueError('model.image_channels must be 3 (colour) or 1 (grayscale data), got '
                         f'{settings.model.image_channels!r}')
    model_config(settings)  # model.* errors (e.g. model.dropout) before any data is read


def model_config(settings: Settings) -> unet.UNetConfig:
    m = settings.model
    return unet.UNetConfig(channels=m.channels,
                           channel_mult=tuple(m.channel_mult),
                           num_res_blocks=m.num_res_blocks,
                           attn_resolutions=tuple(m.attn_resolutions),
                           num_heads=m.num_heads,
                           groups=m.groups,
                           conv_impl=m.conv_impl,
                           dropout=m.dropout,
                           image_channels=m.image_channels,
                           lora_alpha=float(settings.lora.alpha),
                           section='model.')


def prepare(settings: Settings) -> tasks.Task:
    """Loads the images, the public/pool split and the client partition (deterministic)."""
    parts = prepare_parts(settings)
    return tasks.Task(
        name='cifar10',
        metric=METRIC,
        loss_fn=parts.loss_fn,
        pool=parts.pool,
        client_train=parts.client_train,
        client_test=parts.client_test,
        public=parts.public,
        valid=parts.valid,
        test=parts.test,
        labels=parts.labels,
        recipe=recipe(settings),
        info=describe(parts),
        init_backbone=lambda rng: unet.init_params(parts.model_cfg, rng),
        backbone_shapes=lambda: unet.param_shapes(parts.model_cfg),
        evaluator=lambda split, aux: image_generation.evaluator(parts, settings, split, aux),
        sample=lambda variables, rng: image_generation.samples(parts, settings, variables, rng),
        sample_kind='images',
        client_metric=('denoise_mse', lambda x: x),
        classes=parts.class_names,
        aux_nets={
            'classifier':
            tasks.AuxNet(classifier_recipe(settings), lambda: train_classifier(parts, settings))
        })


def prepare_parts(settings: Settings) -> Parts:
    """Loads the images, the public/pool split and the client partition (deterministic)."""
    validate(settings)
    d = settings.data
    limit = d.limit_per_class or None
    train = images.load(d.source, 'train', limit_per_class=limit, field='data.source')
    test = images.load(d.source,
                       'test',
                       limit_per_class=d.test_limit_per_class or None,
                       field='data.source')
    if settings.model.image_channels == 1 and not images.is_gray(train.images):
        raise ValueError(f'model.image_channels=1 needs grayscale images (R = G = B), but '
                         f'data.source={d.source!r} has colour; use model.image_channels=3')
    order = np.random.default_rng([settings.seed, 0xC1]).permutation(len(train.labels))
    n_pub = int(round(d.public_fraction * len(order)))
    n_val = int(round(d.valid_fraction * len(order)))
    pub, val = order[:n_pub], order[n_pub:n_pub + n_val]
    rest = np.sort(order[n_pub + n_val:])
    of = lambda i: {'images': train.images[i], 'labels': train.labels[i]}
    pool = of(rest)
    p = d.partition
    parts = partition.make(p.kind,
                           len(rest),
                           settings.fed.num_clients,
                           settings.seed,
                           labels=pool['labels'],
                           alpha=p.alpha,
                           k=p.k,
                           min_size=p.min_size,
                           names=tasks.PARTITION_NAMES)
    tr, te = partition.local_split(parts,
                                   p.local_test_fraction,
                                   settings.seed,
                                   names=tasks.PARTITION_NAMES)
    cfg = model_config(settings)
    model = unet.UNet(cfg)
    sched = diffusion.make_schedule(settings.diffusion.schedule, settings.diffusion.timesteps)
    return Parts(model=model,
                 model_cfg=cfg,
                 schedule=sched,
                 loss_fn=denoising_loss(model, sched, settings.data.flip, train=True),
                 eval_loss_fn=denoising_loss(model, sched),
                 sampler=image_generation.make_sampler(model, sched, settings.eval.sample_batch,
                                                       settings.diffusion.sample_steps,
                                                       settings.diffusion.ddim_eta),
                 pool=pool,
                 client_train=tr,
                 client_test=te,
                 public=of(pub),
                 valid=of(val),
                 test=dict(images=test.images, labels=test.labels),
                 labels=pool['labels'],
                 class_names=train.class_names)


def recipe(settings: Settings) -> dict:
    """What determines the pre-trained backbone (its cache key). Dropout, flips and one-channel
    images enter only when on, so the recipes (cached backbones) of runs without them stay as
    they were."""
    model = dataclasses.asdict(settings.model)
    if not model['dropout']:
        del model['dropout']
    if model['image_channels'] == 3:
        del model['image_channels']
    public = {
        'source': settings.data.source,
        'limit': settings.data.limit_per_class,
        'public_fraction': settings.data.public_fraction
    }
    if settings.data.flip:
        public['flip'] = True
    return {
        'task': 'cifar10',
        'seed': settings.seed,
        'model': model,
        'diffusion': dataclasses.asdict(settings.diffusion),
        'pretrain': settings.pretrain.recipe(),
        'public': public
    }


def classifier_recipe(settings: Settings) -> dict:
    return {
        'source': settings.data.source,
        'limit': settings.data.limit_per_class,
        'public_fraction': settings.data.public_fraction,
        'valid_fraction': settings.data.valid_fraction,
        'seed': settings.seed,
        **dataclasses.asdict(settings.metrics.classifier)
    }


def train_classifier(task: Parts, settings: Settings) -> dict:
    """The fd_classifier feature network, trained on all train images (public + pool)."""
    c = settings.metrics.classifier
    x = np.concatenate([task.public['images'], task.pool['images']])
    y = np.concatenate([task.public['labels'], task.pool['labels']])
    return classifier.train(x,
                            y,
                            len(task.class_names),
                            c.steps,
                            c.batch_size,
                            c.lr,
                            settings.seed,
                            feature_dim=c.feature_dim,
                            widths=tuple(c.widths),
                            section='metrics.classifier.')


def describe(task: Parts) -> dict:
    return {
        **tasks.client_sizes(task.client_train), 'public_images': len(task.public['labels']),
        'pool_images': len(task.pool['labels']),
        'test_images': len(task.test['labels']),
        'model': dataclasses.asdict(task.model_cfg)
    }
