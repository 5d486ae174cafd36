"""wanbatch: batch image generation for the Wan text-to-image models, resumable and paid once.

The command line is ``wanbatch``; the same run from Python is ``await wanbatch.run(manifest, out=...)``.
"""

from .api import BudgetExceeded, run
from .engine import Engine, EngineConfig
from .errors import ManifestError, WanbatchError
from .manifest import Manifest
from .plan import make_plan

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "Engine",
    "EngineConfig",
    "Manifest",
    "ManifestError",
    "WanbatchError",
    "__version__",
    "make_plan",
    "run",
]
