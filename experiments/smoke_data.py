"""The smoke scale's data, written by experiments.reproduce into its workdir: a tiny two-topic
PTB-format corpus and ten classes of small PNGs (the shapes of tests/conftest.py's fixtures), so
a smoke reproduce needs no dataset and takes minutes."""
import os

import numpy as np
from PIL import Image


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
