"""wanbatch: batch image generation for the Wan text-to-image models, resumable and paid once.

The command line is ``wanbatch``; the same run from Python is ``await wanbatch.run(manifest, out=...)``.
"""

from wanbatch.api import run
from wanbatch.engine import Engine, EngineConfig
from wanbatch.errors import BudgetExceeded, ManifestError, WanbatchError
from wanbatch.manifest import Manifest
from wanbatch.manifest.plan import make_plan

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
