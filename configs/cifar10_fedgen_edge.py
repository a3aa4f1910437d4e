"""FedGen-Edge on CIFAR-10: frozen DDPM U-Net backbone, federated LoRA on its attention.

Default (a 2-core CPU, about 20 minutes; reads the offline JPEG copy of CIFAR-10):
    python -m experiments.train --config configs/cifar10_fedgen_edge.py --workdir runs/c10
Point data.source at any supported layout: the official cifar-10-batches-bin / -py directory,
'tfds:cifar10', or an image-folder directory / .tar.gz of split/<class>/*.png|jpg:
    --config.data.source=/data/cifar-10-batches-bin
Paper scale (GPU; 100 clients, 500 rounds, a 64-channel U-Net, FID with Inception weights):
    python -m experiments.train --config configs/cifar10_fedgen_edge.py:full --workdir runs/c10f \
        --config.metrics.inception_path=/weights/pt_inception.npz
Tiny (what the tests run, on their own tiny image folder):
    python -m experiments.train --config configs/cifar10_fedgen_edge.py:tiny --workdir runs/t \
        --config.data.source=/path/to/tiny/folder

Settings (default): the server pre-trains a 16-channel U-Net (levels 32/16/8, one residual block
each, self-attention at 16x16; 0.28M parameters) for 600 Adam steps on a seeded 10% of the train
images (its public portion, disjoint from client data); the next 2% are held out for validation;
the other 88% go to 100 clients with per-label Dirichlet(0.3) skew (Yurochkin et al. 2019), 20%
of each held out as its local test split. LoRA rank 2 on the attention q/k/v/o projections (0.73%
of the model's bytes). 20 rounds of 10 clients, each at most 4 local Adam steps of 16 images.
Practitioners' options, all off by default (so existing runs are unchanged): data.flip (random
horizontal flips), model.dropout (in the residual blocks) and fed.ema_decay (a server-side EMA of
the global adapter, used for samples and reported as <metric>_ema beside the raw model's numbers).
DDPM's CIFAR-10 recipe, with a decay that suits hundreds of rounds rather than 800k steps:
    --config.data.flip=True --config.model.dropout=0.1 --config.fed.ema_decay=0.9
Quality: fd_classifier (a Fréchet distance in the 64-d features of a small CNN trained here on the
public and pool images; not FID) of 200 DDIM-10 samples (eta 0) against the validation images,
every 5 rounds, plus a 10x10 sample grid; the final numbers are also taken on the test split.
"""
import ml_collections

from configs import federation

SHARED_CIFAR = '../shared/data/cifar10-jpeg.tar.gz'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = 'cifar10'
    c.seed = 0
    c.data = dict(
        source=SHARED_CIFAR,
        limit_per_class=0,  # 0 = every image; >0 keeps the first n per class (quick runs)
        test_limit_per_class=0,
        public_fraction=0.1,  # a seeded 10% of the train images: the server's public portion
        valid_fraction=0.02,  # the next 2% (1,000 images): held-out validation
        partition=dict(kind='dirichlet_label', alpha=0.3, k=2, min_size=10,
                       local_test_fraction=0.2),
        flip=False,  # True: random horizontal flips of training images (pre-training + clients)
    )
    c.model = dict(
        channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16, ),
        num_heads=1,
        groups=4,
        dropout=0.0,  # in [0, 1): residual-block dropout while training (DDPM: 0.1)
        image_channels=3,  # 1 for grayscale data (R = G = B), diffused as one channel
        conv_impl='im2col')  # 'xla' on GPU/TPU (docs/performance.md)
    c.diffusion = dict(schedule='linear', timesteps=1000, sample_steps=10, ddim_eta=0.0)
    c.lora = dict(rank=2, alpha=16.0, targets=('attn', ), client_ranks='')
    # ema_decay > 0: the backbone is the EMA of the weights over the pre-training steps.
    c.pretrain = dict(steps=600,
                      batch_size=16,
                      opt='adam',
                      lr=1e-3,
                      backbone_path='',
                      ema_decay=0.0)
    c.fed = federation.fed(rounds=20, max_steps_per_epoch=4, client_lr=1e-3)
    # In [0, 1): the server's EMA of the global adapter (samples, fd_classifier/FID and the
    # metric_ema columns); 0 = off. With warm-up min(decay, (1 + t) / (10 + t))
    # (fedgen.fl.algorithm).
    c.fed.ema_decay = 0.0
    c.eval = dict(every=5,
                  batch_size=64,
                  loss_images=512,
                  fd_samples=200,
                  sample_batch=100,
                  num_samples=100,
                  samples_every_eval=True)
    c.metrics = dict(
        inception_path='',
        cache_dir='',  # where the fd_classifier is cached ('' = the workdir)
        classifier=dict(steps=600, batch_size=64, lr=2e-3, feature_dim=64, widths=(16, 32, 64, 64)))
    # Personalization (experiments.personalize): E_p local epochs on each client's own train split.
    c.personalize = dict(epochs=1, opt='adam', lr=5e-4, max_steps=0)
    c.checkpoint = dict(keep=3, overwrite=False)  # True: replace a run of another config
    if arg == 'tiny':
        c.data.update(limit_per_class=0, public_fraction=0.3)
        c.data.partition.update(min_size=2)
        c.model.update(channels=8, channel_mult=(1, 2), attn_resolutions=(16, ), groups=4)
        c.diffusion.update(timesteps=50, sample_steps=3)
        c.lora.rank = 2
        c.pretrain.update(steps=10, batch_size=4)
        c.fed.update(num_clients=4,
                     clients_per_round=2,
                     rounds=2,
                     batch_size=4,
                     client_chunk=1,
                     max_steps_per_epoch=2)
        c.eval.update(every=1,
                      batch_size=8,
                      loss_images=16,
                      fd_samples=16,
                      sample_batch=8,
                      num_samples=8)
        c.metrics.classifier.update(steps=20, batch_size=16, feature_dim=8, widths=(8, 8, 8, 8))
    elif arg == 'full':
        # Paper scale, for a GPU: 100 clients, 500 rounds, a 64-channel two-block U-Net.
        c.model.update(channels=64, num_res_blocks=2, groups=32, conv_impl='xla')  # 6.5M params
        c.diffusion.sample_steps = 100
        c.lora.rank = 8
        c.pretrain.update(steps=50000, batch_size=128, lr=2e-4)
        c.fed.update(rounds=500,
                     local_epochs=1,
                     max_steps_per_epoch=0,
                     batch_size=32,
                     client_chunk=10)
        c.eval.update(every=25, fd_samples=10000, sample_batch=500)
        c.metrics.classifier.update(steps=10000,
                                    batch_size=128,
                                    feature_dim=128,
                                    widths=(32, 64, 128, 128))
    elif arg:
        raise ValueError(f'config argument must be "", "tiny" or "full", got {arg!r}')
    c.lock()
    return c
