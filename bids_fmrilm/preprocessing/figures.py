"""Quality-control figures of the minimal pipeline (PNG bytes; the caller writes them atomically)."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def registration_figure(mean_bold: nib.Nifti1Image, template: nib.Nifti1Image, title: str) -> bytes:
    """Template edges (red) over the normalised mean EPI, three orthogonal views."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    fig = plt.figure(figsize=(9, 3.2))
    display = plotting.plot_anat(mean_bold, display_mode="ortho", cut_coords=(0, -18, 12), figure=fig,
                                 title=title, dim=0.0, draw_cross=False, annotate=True)
    display.add_edges(template, color="r")
    return _png(fig)


def fd_figure(fd: np.ndarray, tr: float, title: str, threshold: float = 0.5) -> bytes:
    """Framewise displacement over time, with the 0.5 mm threshold line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fd = np.asarray(fd, float)
    t = np.arange(len(fd)) * tr
    fig, ax = plt.subplots(figsize=(9, 2.4))
    ax.plot(t, fd, color="k", lw=1)
    ax.axhline(threshold, color="r", ls="--", lw=0.8, label=f"{threshold:g} mm")
    mean = np.nanmean(fd) if np.isfinite(fd).any() else float("nan")
    ax.set_title(f"{title}  (mean FD {mean:.3f} mm, {int(np.nansum(fd > threshold))} volumes > {threshold:g} mm)",
                 fontsize=9)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("FD (mm)")
    ax.set_xlim(0, max(t[-1] if len(t) else 1.0, tr))
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)
