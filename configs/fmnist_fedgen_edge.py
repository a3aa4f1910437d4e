"""FedGen-Edge on Fashion-MNIST: the CIFAR-10 diffusion task (fedgen.tasks.cifar10) on a second
real image set, small enough for CI.

Data: the Debian/Ubuntu package (standard IDX files in /usr/share/datasets/fashion-mnist):
    apt-get install -y dataset-fashion-mnist
or any directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]:
    --config.data.source=fashion_mnist:/data/fashion-mnist
The 28x28 grayscale images are zero-padded to 32x32 (2 pixels a side; 0 is the background) and
repeated over 3 channels, so the fd_classifier and the sample grids are CIFAR-10's. The U-Net
diffuses one channel (model.image_channels=1: three independent noise channels would sample
colour where the data has none); its samples are repeated over R, G and B.

Default (a 2-core CPU, about 20 minutes; the CIFAR-10 default's model and schedule):
    python -m experiments.train --config configs/fmnist_fedgen_edge.py --workdir runs/fmnist
CI (real data, the :tiny model, 20 train images per class, 2 rounds; about a minute):
    python -m experiments.train --config configs/fmnist_fedgen_edge.py:ci --workdir runs/fm_ci
Tiny (what the tests run, on IDX files they write themselves):
    python -m experiments.train --config configs/fmnist_fedgen_edge.py:tiny --workdir runs/t \
        --config.data.source=fashion_mnist:/path/to/tiny/idx
Paper scale (GPU): configs/fmnist_fedgen_edge.py:full.

Differences from configs/cifar10_fedgen_edge.py: the data source; one image channel; random
horizontal flips (clothes are left-right symmetric in distribution) and a server-side EMA of the
global adapter (decay 0.9 with warm-up; samples come from it and every metric is also reported as
<metric>_ema).
"""
import ml_collections

from configs import cifar10_fedgen_edge

FASHION_MNIST = 'fashion_mnist:/usr/share/datasets/fashion-mnist'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
    if arg not in ('', 'tiny', 'ci', 'full'):
        raise ValueError(f'config argument must be "", "tiny", "ci" or "full", got {arg!r}')
    c = cifar10_fedgen_edge.get_config('tiny' if arg == 'ci' else arg)
    c.data.source = FASHION_MNIST
    c.data.flip = True
    c.model.image_channels = 1
    c.fed.ema_decay = 0.9
    if arg == 'ci':
        c.data.update(limit_per_class=20, test_limit_per_class=5)
    return c
