"""What the tests share beyond fixtures: one module per concern, imported as ``from helpers.engine import ...``.

``tests/`` is on the import path (``pythonpath`` in pyproject.toml), so this folder is a package and the test
folders are not: pytest imports each test file by its base name, which is why those names are unique.
"""
