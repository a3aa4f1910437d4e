"""The smoke scale's data, written by experiments.reproduce into its workdir: a tiny two-topic
PTB-format corpus, ten classes of small PNGs (the shapes of tests/conftest.py's fixtures) and ten
classes of Fashion-MNIST-format IDX files, so a smoke reproduce needs no dataset and takes
minutes."""
import os

import numpy as np
from PIL import Image

from fedgen.data import idx


def write_corpus(directory: str) -> str:
    """A tiny two-topic PTB-format corpus, ptb.{train,valid,test}.txt (tests/conftest.py's)."""
    rng = np.random.default_rng(0)
    topics = [[f'w{i}' for i in range(30)], [f'v{i}' for i in range(30)]]
    os.makedirs(directory, exist_ok=True)
    for split, n in (('train', 700), ('valid', 60), ('test', 60)):
        lines = (' '.join(rng.choice(topics[(s // 20) % 2], size=rng.integers(4, 10)))
                 for s in range(n))
        with open(os.path.join(directory, f'ptb.{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return directory


def write_images(root: str) -> str:
    """10 classes of noisy flat-colour 32x32 PNGs, 10 train and 3 test each (conftest's)."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 10), ('test', 3)):
        for k in range(10):
            d = os.path.join(root, split, f'class{k}')
            os.makedirs(d, exist_ok=True)
            color = np.array([25 * k, 255 - 25 * k, (70 * k) % 255])
            for i in range(n):
                img = np.clip(color + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f'{i:04d}.png'))
    return root


def write_fashion_idx(root: str, per_class=(10, 3)) -> str:
    """10 classes of 28x28 'garments': a left-leaning bright bar whose column and height depend
    on the class (so a mirror image differs), plus noise; gzipped IDX files like the Debian
    package's, ``per_class`` (train, test) images per class. Returns the data.source string."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for prefix, n in zip(('train', 't10k'), per_class):
        labels = np.repeat(np.arange(10), n).astype(np.uint8)
        gray = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            gray[i, 4:8 + 2 * k, 2 + k:6 + k] = 200
        idx.write(gray, os.path.join(root, f'{prefix}-images-idx3-ubyte.gz'))
        idx.write(labels, os.path.join(root, f'{prefix}-labels-idx1-ubyte.gz'))
    return f'fashion_mnist:{root}'
