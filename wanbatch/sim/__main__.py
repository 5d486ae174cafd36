"""``python -m wanbatch.sim``: the same as ``wanbatch sim``."""

import sys

from wanbatch.sim.cli import main

sys.exit(main())
