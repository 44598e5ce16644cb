"""The report's histogram PNG: caption lengths and every recorded score, one panel each."""
from __future__ import annotations

import os


def plot_histograms(scores: dict, path: str) -> None:
    """One histogram per score (caption_words first); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(scores, key=lambda k: (k != "caption_words", k)) or ["caption_words"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = scores.get(name, [])
        if values:
            ax.hist(values, bins=min(40, max(5, len(set(values)))), color="#4472c4")
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("words" if name == "caption_words" else name)
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
