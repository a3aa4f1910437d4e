"""Figures written by the experiments: sample grids and per-client label histograms (PNG)."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_grid(images: np.ndarray, path: str, cols: int = 8, scale: int = 2) -> None:
    """uint8 [N, H, W, 3] -> one PNG grid (rows of ``cols``), each image upscaled ``scale``x."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)


def label_histograms(hist: np.ndarray, class_names, path: str, max_clients: int = 100) -> None:
    """Stacked bars of each client's label counts, hist [num_clients, num_classes]."""
    hist = hist[:max_clients]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.15 * len(hist)), 4))
    bottom = np.zeros(len(hist))
    colors = plt.get_cmap('tab10')
    for k, name in enumerate(class_names):
        ax.bar(np.arange(len(hist)),
               hist[:, k],
               bottom=bottom,
               color=colors(k % 10),
               label=name,
               width=0.9)
        bottom += hist[:, k]
    ax.set_xlabel('client')
    ax.set_ylabel('local train examples')
    ax.set_title('per-client label histogram')
    ax.legend(fontsize=7, ncol=5, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
