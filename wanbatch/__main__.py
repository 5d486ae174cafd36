"""``python -m wanbatch`` is the ``wanbatch`` command."""

from wanbatch.cli import main

raise SystemExit(main())
