"""Callbacks, one concern per module."""
from .core import *  # noqa: F401,F403
from .core import __all__ as _core
from .debug import *  # noqa: F401,F403
from .debug import __all__ as _debug
from .hooks import *  # noqa: F401,F403
from .hooks import __all__ as _hooks

__all__ = [*_core, *_debug, *_hooks]
