"""Showing figures: inline in a notebook, saved as PNG elsewhere, without touching matplotlib's global state."""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ['in_notebook', 'subplots', 'show_or_save']


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where figures display inline)."""
    ip = sys.modules.get('IPython')
    if ip is None: return False
    shell = getattr(ip, 'get_ipython', lambda: None)()
    return shell is not None and type(shell).__name__ == 'ZMQInteractiveShell'


def _matplotlib():
    try: import matplotlib
    except ImportError: raise ImportError('plotting needs matplotlib: pip install matplotlib (or ultraloop[plot])') from None
    return matplotlib


def subplots(*args, **kwargs):
    """`(fig, axes)` as `plt.subplots` makes them. Outside a notebook the figure is a plain `matplotlib.figure.Figure`,
    which saves to PNG through Agg by itself: no backend is chosen for the user's process and pyplot keeps no reference
    to it. In a notebook pyplot makes it, so the notebook's own backend displays it."""
    _matplotlib()
    if in_notebook():
        import matplotlib.pyplot as plt
        return plt.subplots(*args, **kwargs)
    from matplotlib.figure import Figure
    figsize = kwargs.pop('figsize', None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def show_or_save(fig, path: str | os.PathLike | None, default_name: str) -> Path | None:
    """Display `fig` inline in a notebook (and save it too when `path` is given); elsewhere save it to `path`
    (default: `default_name` in the working directory). Returns the PNG's path, or None."""
    saved = None
    if path is not None or not in_notebook():
        saved = Path(path if path is not None else default_name)
        saved.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(saved, dpi=100, bbox_inches='tight')
    if in_notebook():
        import matplotlib.pyplot as plt
        from IPython.display import display
        display(fig)
        plt.close(fig)
    return saved
