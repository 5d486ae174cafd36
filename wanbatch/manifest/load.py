"""The job manifest: a YAML file that expands, streaming, into generation items.

    Manifest.from_yaml(path)   load and check; every error found is raised at once (file:line and field)
    manifest.count()           how many items the manifest writes, by arithmetic (repeats counted)
    manifest.survey()          every item through the catalog's rules; distinct items per (region, model)
    manifest.validate()        the survey's warnings; errors raised
    manifest.items()           the items, one at a time, never all in memory
    manifest.digest            sha256 of the text, the prompts files and the version: same digest, same items

The language is described in docs/manifest.md. The loader lives in
:mod:`wanbatch.manifest.yamlsrc`, value rules in :mod:`wanbatch.manifest.values`, prompts
files in :mod:`wanbatch.manifest.files`, the structure in
:mod:`wanbatch.manifest.parse`, the expansion into items (and their ids) in
:mod:`wanbatch.manifest.expand`, and the survey (catalog checks, counts,
repeats, output names) in :mod:`wanbatch.manifest.survey`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wanbatch.errors import ManifestInvalid
from wanbatch.manifest.expand import DEFAULT_OUTPUT, Item, draw_seed, entry_items, item_id
from wanbatch.manifest.parse import Plan, parse
from wanbatch.manifest.survey import Survey, survey_plan
from wanbatch.manifest.values import Problems
from wanbatch.manifest.yamlsrc import load_yaml

__all__ = ["DEFAULT_OUTPUT", "Item", "Manifest", "draw_seed", "item_id"]

#: Bumped when the expansion or the plan changes in a way the package version would not show.
_DIGEST_FORMAT = b"wanbatch manifest digest 2\x00"
_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A loaded, structurally valid manifest. Build it with :meth:`from_yaml`."""

    name: str
    path: Path
    region: str  #: the default region of every entry
    budget: float | None  #: CNY; the engine stops submitting before spending more
    output: str | None  #: the top-level output pattern
    max_items: int
    plan: Plan = field(repr=False)
    #: sha256 of everything the expansion reads (see :func:`_digest`): equal digests, equal items
    digest: str = ""

    @classmethod
    def from_yaml(cls, path: str | Path) -> Manifest:
        """Load and check the structure; raises :class:`ManifestInvalid` listing every error found."""
        path = Path(path)
        problems = Problems()
        # Hashed before it is read: should the file change in between, the digest is the older one, and the
        # next run re-plans rather than trusting a ledger planned from other text.
        text_digest = _file_digest(path) if path.is_file() else ""
        root, load_errors = load_yaml(path, path.as_posix())
        problems.add(load_errors)
        plan = parse(root, path.parent, problems) if root is not None else None
        if problems.errors or plan is None:
            if plan is not None:
                _survey_sound_entries(plan, problems)
            raise _invalid(problems, path)
        output = plan.output.value.text if plan.output is not None else None
        return cls(
            name=plan.name,
            path=path,
            region=plan.region,
            budget=plan.budget,
            output=output,
            max_items=plan.max_items,
            plan=plan,
            digest=_digest(path, text_digest, plan),
        )

    def count(self) -> int:
        """How many items :meth:`items` yields (identical requests counted each time they appear)."""
        return sum(entry.count for entry in self.plan.entries)

    def items(self) -> Iterator[Item]:
        """The items in manifest order, streaming; raises :class:`ManifestInvalid` at the first bad one.

        Identical requests come each time they appear (with the same id): the ledger keeps one item for them.
        """
        problems = Problems()
        for entry in self.plan.entries:
            for item in entry_items(entry, problems):
                if item is None:
                    raise ManifestInvalid(problems.errors, manifest=self.path.as_posix())
                yield item

    def validate(self) -> list[str]:
        """Check every item against the catalog; returns the warnings, raises :class:`ManifestInvalid`."""
        return self.survey().warnings

    def survey(self) -> Survey:
        """Check every item; count distinct items and images per (region, model) and the rows that repeat one.

        Raises :class:`ManifestInvalid` with the errors found (up to :data:`MAX_ERRORS`).
        """
        problems = Problems()
        found = survey_plan(self.plan, problems)
        if problems.errors:
            raise _invalid(problems, self.path)
        return found


def _survey_sound_entries(plan: Plan, problems: Problems) -> None:
    """Add the catalog's errors of the entries that parsed well, so that one pass reports every error.

    Not when the manifest is too large (its expansion could take forever), nor for an entry that inherits a
    top-level value that was refused (its errors would only repeat that one).
    """
    if problems.full or sum(entry.count for entry in plan.entries) > plan.max_items:
        return
    sound = [entry for entry in plan.entries if not entry.inherits_errors]
    survey_plan(plan, problems, sound)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(path: Path, text_digest: str, plan: Plan) -> str:
    """The manifest's digest: its path and text, every prompts file it reads, and this wanbatch's version.

    The path is in it because items name their source by it (and the name defaults to its stem); the
    version because the catalog's defaults and prices shape the items too.
    """
    from wanbatch import __version__

    digest = hashlib.sha256(_DIGEST_FORMAT)
    parts = [__version__, path.as_posix(), text_digest]
    for entry in plan.entries:
        if entry.source is not None:
            parts += [entry.field, entry.source.display, _file_digest(entry.source.path)]
    digest.update("\x00".join(parts).encode())
    return digest.hexdigest()


def _invalid(problems: Problems, path: Path) -> ManifestInvalid:
    """The errors in reading order: the manifest's by line, then its prompts files'."""
    manifest = path.as_posix()
    ordered = sorted(problems.errors, key=lambda error: (error.path != manifest, error.path, error.line or 0))
    return ManifestInvalid(ordered, manifest=manifest, truncated=problems.truncated)
