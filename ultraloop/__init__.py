"""ultraloop: a PyTorch training loop you can read in one sitting, bent by ten-line callbacks."""
from .callbacks import *  # noqa: F401,F403
from .callbacks import __all__ as _callbacks
from .data import *  # noqa: F401,F403
from .data import __all__ as _data
from .learner import *  # noqa: F401,F403
from .learner import __all__ as _learner
from . import summary as _summary  # noqa: F401  (attaches learn.summary)

__version__ = '0.1.0'
__all__ = [*_learner, *_data, *_callbacks]
