"""Showing figures: inline in a notebook, saved as PNG elsewhere (matplotlib is an optional dependency)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ['in_notebook', 'get_plt', 'show_or_save']


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where figures display inline)."""
    ip = sys.modules.get('IPython')
    if ip is None: return False
    shell = getattr(ip, 'get_ipython', lambda: None)()
    return shell is not None and type(shell).__name__ == 'ZMQInteractiveShell'


def get_plt():
    """matplotlib.pyplot, with a non-interactive backend outside notebooks; a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install matplotlib (or ultraloop[plot])') from None
    if not in_notebook() and not os.environ.get('MPLBACKEND'): matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def show_or_save(fig, path: str | os.PathLike | None, default_name: str) -> Path | None:
    """Display `fig` inline in a notebook (and save it too when `path` is given); elsewhere save it to `path`
    (default: `default_name` in the working directory) and close it. Returns the PNG's path, or None."""
    plt = get_plt()
    saved = None
    if path is not None or not in_notebook():
        saved = Path(path if path is not None else default_name)
        saved.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(saved, dpi=100, bbox_inches='tight')
    if in_notebook():
        from IPython.display import display
        display(fig)
    plt.close(fig)
    return saved
