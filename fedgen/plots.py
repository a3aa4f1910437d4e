"""Figures written by the experiments: sample grids, label histograms and grid comparisons (PNG)."""
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


def grouped_bars(labels,
                 series: dict,
                 path: str,
                 ylabel: str,
                 title: str,
                 reference: tuple[str, float] | None = None) -> None:
    """One bar per (label, group): ``series[group]`` holds a value per label (None = no bar);
    ``reference`` (name, value) draws a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(labels) * max(1, len(series)) / 2 + 2), 4))
    width = 0.8 / max(1, len(series))
    for g, (group, values) in enumerate(series.items()):
        x = np.arange(len(labels)) + (g - (len(series) - 1) / 2) * width
        v = np.array([np.nan if y is None else y for y in values], np.float64)
        ax.bar(x, v, width=width, label=str(group))
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [y for values in series.values() for y in values if y is not None and np.isfinite(y)]
    if reference is not None:
        ax.axhline(reference[1], color='k', linestyle='--', linewidth=1, label=reference[0])
        finite.append(reference[1])
    if finite:  # zoom to the spread: differences between rows are the result
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo) + 1e-3 * abs(hi)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(series: dict, path: str, xlabel: str, ylabel: str, title: str) -> None:
    """One line per name: ``series[name]`` is a list of (x, y) points."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, points) in enumerate(series.items()):
        if points:  # the colour cycle has 10 entries: later lines are dashed
            x, y = zip(*points)
            ax.plot(x, y, label=name, marker='.', linestyle='-' if i < 10 else '--')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
