"""``python -m wanbatch`` is the ``wanbatch`` command."""

from .cli import main

raise SystemExit(main())
