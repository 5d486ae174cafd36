"""Where things are: the repository and the tests' data, whichever folder a test file sits in."""

from __future__ import annotations

from pathlib import Path

#: The repository's root (the folder holding pyproject.toml, jobs/ and benchmarks/).
REPO = Path(__file__).resolve().parents[2]
#: The tests' data: manifests the tests read.
MANIFESTS = REPO / "tests" / "manifests"
#: The corpus of malformed manifests, each saying where its first error is.
BAD_MANIFESTS = MANIFESTS / "bad"
