"""The figure plumbing shared by favor's plots: matplotlib on the file-only Agg backend, and one way
to write a figure (tight layout, parent folders created, figure closed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_path(path: str | os.PathLike) -> Path:
    """``path`` as :func:`save_figure` will write it (``.png`` added when there is no suffix); a
    ``ValueError`` naming the suffix if matplotlib cannot write that format.  For checking an
    output path before the work that the figure ends."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"cannot write a figure to {str(path)!r}: unsupported suffix {path.suffix!r}; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    return path


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it.  A path without a
    suffix gets ``.png`` (as matplotlib would add it).  Returns the path written."""
    path = figure_path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
