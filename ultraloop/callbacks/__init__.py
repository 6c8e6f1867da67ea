"""Callbacks, one concern per module."""
from .accel import *  # noqa: F401,F403
from .accel import __all__ as _accel
from .augment import *  # noqa: F401,F403
from .augment import __all__ as _augment
from .checkpoint import *  # noqa: F401,F403
from .checkpoint import __all__ as _checkpoint
from .core import *  # noqa: F401,F403
from .core import __all__ as _core
from .debug import *  # noqa: F401,F403
from .debug import __all__ as _debug
from .distributed import *  # noqa: F401,F403
from .distributed import __all__ as _distributed
from .hooks import *  # noqa: F401,F403
from .hooks import __all__ as _hooks
from .integrations import *  # noqa: F401,F403
from .integrations import __all__ as _integrations
from .logs import *  # noqa: F401,F403
from .logs import __all__ as _logs
from .lr_finder import *  # noqa: F401,F403
from .lr_finder import __all__ as _lr_finder
from .metrics import *  # noqa: F401,F403
from .metrics import __all__ as _metrics
from .optim import *  # noqa: F401,F403
from .optim import __all__ as _optim
from .precision import *  # noqa: F401,F403
from .precision import __all__ as _precision
from .progress import *  # noqa: F401,F403
from .progress import __all__ as _progress
from .safety import *  # noqa: F401,F403
from .safety import __all__ as _safety
from .schedule import *  # noqa: F401,F403
from .schedule import __all__ as _schedule
from .speed import *  # noqa: F401,F403
from .speed import __all__ as _speed

__all__ = [*_core, *_debug, *_hooks, *_precision, *_optim, *_schedule, *_lr_finder, *_metrics, *_progress, *_logs, *_speed,
           *_accel, *_augment, *_safety, *_checkpoint, *_distributed,
           *_integrations]
