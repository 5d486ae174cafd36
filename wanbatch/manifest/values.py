"""The values a manifest may hold: parameters, templates, and the errors about them.

One place decides what each parameter accepts (from YAML or from a prompts
file's text cell), how it is normalised (``1024x1024`` → ``1024*1024``), and
how an error reads: where, which field, what was found, what is allowed, and
the nearest valid word ("did you mean ...?").
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wanbatch import catalog
from wanbatch.errors import ManifestError
from wanbatch.manifest.yamlsrc import Origin, kind_of

__all__ = [
    "MAX_ERRORS",
    "PARAMS",
    "RESERVED",
    "Problems",
    "Template",
    "Val",
    "coerce_param",
    "did_you_mean",
    "did_you_mean_model",
    "parse_template",
    "variable_text",
]

#: The request parameters a manifest can set, anywhere a parameter can be set.
PARAMS = ("model", "size", "n", "seed", "negative_prompt", "prompt_extend", "watermark", "region", "sync")
#: Names that the output pattern owns, so no variable may take them.
RESERVED = ("item_id", "index", "replica", "repeats")
#: Errors collected before giving up: enough to fix a file in one go, few enough to read.
MAX_ERRORS = 50

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_SIZE = re.compile(r"^\s*(\d+)\s*[*xX×]\s*(\d+)\s*$")
#: The version in a model's name: ``2.5`` in ``wan2.5-t2i-preview``.
_VERSION = re.compile(r"\d+(?:\.\d+)?")
_N_MAX = max(model.n_max for model in catalog.MODELS.values())


def _model_aliases() -> dict[str, str]:
    """Every name a model goes by in some region (wan2.1-t2i-turbo in Singapore) → its canonical name."""
    names = {name: name for name in catalog.MODELS}
    for region in catalog.REGIONS:
        for offer in catalog.offers_in(region):
            names.setdefault(offer.api_name, offer.model.name)
    return names


MODEL_NAMES = _model_aliases()


@dataclass(frozen=True, slots=True)
class Val:
    """A value and where it was written."""

    value: Any
    origin: Origin


def did_you_mean_model(word: object, choices: Iterable[str]) -> str:
    """Like :func:`did_you_mean`, among the models of the version ``word`` names only.

    Models of another version make other images at another price: a near spelling of one (``wan2.5-t2i``
    and ``wan2.6-t2i``) is no hint. Several near ones of the version (``wan2.2-t2i``: plus or flash) are all
    named, and a word naming no version gets no hint: the error lists the choices.
    """
    version = _VERSION.search(word) if isinstance(word, str) else None
    if version is None:
        return ""
    same = [name for name in choices if (found := _VERSION.search(name)) and found[0] == version[0]]
    scores = {name: difflib.SequenceMatcher(None, word, name).ratio() for name in same}
    best = max(scores.values(), default=0.0)
    # Names as near as the nearest (within a typo's worth) are all named: which was meant is the user's call.
    near = [name for name, score in scores.items() if score >= 0.6 and score >= best - 0.1]
    if len(near) > 1:
        return "; did you mean one of " + ", ".join(map(repr, near)) + "?"
    return f"; did you mean {near[0]!r}?" if near else ""


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest choice, or nothing when none is near."""
    if not isinstance(word, str):
        return ""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


class Problems:
    """Errors and warnings found so far, each said once, errors capped at :data:`MAX_ERRORS`."""

    def __init__(self, cap: int = MAX_ERRORS) -> None:
        self.errors: list[ManifestError] = []
        self.warnings: list[str] = []
        self.truncated = False
        self._cap = cap
        self._seen: set[tuple[str, str, str]] = set()

    @property
    def full(self) -> bool:
        return len(self.errors) >= self._cap

    def error(self, origin: Origin, message: str) -> None:
        key = (origin.where(), origin.field, message)
        if key in self._seen:
            return
        if self.full:
            self.truncated = True
            return
        self._seen.add(key)
        self.errors.append(ManifestError(message, path=origin.file, line=origin.line, field=origin.field))

    def add(self, errors: Iterable[ManifestError]) -> None:
        """Errors made elsewhere (the YAML loader's), kept as they are."""
        for error in errors:
            if not self.full:
                self.errors.append(error)

    def warn(self, origin: Origin, message: str) -> None:
        key = (origin.where(), origin.field, message)
        if key in self._seen or len(self.warnings) >= self._cap:
            return
        self._seen.add(key)
        self.warnings.append(f"{origin.where()}: {origin.field}: {message}")


@dataclass(frozen=True, slots=True)
class Template:
    """Text with ``{variable}`` holes; ``{{`` and ``}}`` are literal braces."""

    text: str
    parts: tuple[tuple[str, str | None], ...]  #: (literal text, variable name or None)
    names: frozenset[str]

    @classmethod
    def literal(cls, text: str) -> Template:
        """Text taken as it is (a prompts file's line): its braces are not holes."""
        return cls(text, ((text, None),), frozenset())

    def render(self, variables: Mapping[str, str]) -> str:
        if not self.names:
            return "".join(literal for literal, _ in self.parts)
        return "".join([literal + variables[name] if name is not None else literal for literal, name in self.parts])

    def missing(self, available: Collection[str]) -> list[str]:
        missing = [name for name in self.names if name not in available]
        return sorted(missing) if missing else missing


def parse_template(text: str) -> Template | str:
    """The template, or what is wrong with it."""
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError:
        return (
            f"found an unmatched brace in {text!r}; allowed: {{name}} for a variable, {{{{ and }}}} for literal braces"
        )
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in pieces:
        if name is None:
            parts.append((literal, None))
            continue
        if not name.strip() or spec or conversion:
            shown = "{" + (name or "") + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return f"found {shown} in {text!r}; allowed: a variable name in braces, like {{animal}}"
        parts.append((literal, name))
    return Template(text, tuple(parts), frozenset(name for _, name in parts if name is not None))


def variable_text(value: Any) -> str | None:
    """A variable's text from a scalar (YAML or JSON), or None if it is not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return None


def coerce_param(key: str, raw: Any, *, from_text: bool = False) -> tuple[Any, str | None]:
    """``(normalised value, None)`` or ``(None, "found ...; allowed ...")`` for one parameter value.

    ``from_text`` says the value is a prompts file's cell (a string to be
    read as a number or a boolean where the parameter needs one). ``seed``
    here is one seed; lists, ranges and counts are read by the caller.
    """
    return _COERCE[key](raw, from_text)


def _found(raw: Any, allowed: str, suggestion: str = "") -> tuple[None, str]:
    return None, f"found {kind_of(raw)}; allowed: {allowed}{suggestion}"


def _model(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    if isinstance(raw, str) and raw.strip() in MODEL_NAMES:
        return MODEL_NAMES[raw.strip()], None
    return _found(raw, "one of " + ", ".join(catalog.MODELS), did_you_mean_model(raw, catalog.MODELS))


def _size(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    match = _SIZE.match(raw) if isinstance(raw, str) else None
    if match is None or int(match[1]) == 0 or int(match[2]) == 0:
        return _found(raw, 'width*height in pixels, like "1024*1024" (1024x1024 is read the same)')
    return f"{int(match[1])}*{int(match[2])}", None


def _int(raw: Any, from_text: bool, low: int, high: int, what: str) -> tuple[Any, str | None]:
    value = raw
    if from_text and isinstance(raw, str) and raw.strip().isdigit():
        value = int(raw.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return _found(raw, f"{what} from {low} to {high}")
    return value, None


def _n(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    return _int(raw, from_text, 1, _N_MAX, "a whole number of images")


def _seed(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    if raw is None:
        return None, None
    return _int(raw, from_text, 0, catalog.SEED_MAX, "a whole number")


def _text(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    if raw is None or isinstance(raw, str):
        return raw, None
    return _found(raw, "text (quote it)")


def _bool(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    if isinstance(raw, bool):
        return raw, None
    if from_text and isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.strip().lower()], None
    return _found(raw, "true or false")


_REGIONS_ALLOWED = (
    "one of " + ", ".join(catalog.REGIONS) + f", a list of them ([beijing, singapore]) or {catalog.ANY_REGION}"
)


def _region(raw: Any, from_text: bool) -> tuple[Any, str | None]:
    """One region; several (a list, or ``a|b`` in a text source) as their canonical ``a|b`` in catalog order, a
    list of one as that region; or ``any``."""
    if isinstance(raw, str) and raw.strip() in (*catalog.REGIONS, catalog.ANY_REGION):
        return raw.strip(), None
    parts = raw.split(catalog.REGION_JOIN) if from_text and isinstance(raw, str) else raw
    if isinstance(parts, list):  # a YAML list holds its loaded nodes
        parts = [getattr(part, "value", part) for part in parts]
    if isinstance(parts, list) and parts and all(isinstance(p, str) and p.strip() in catalog.REGIONS for p in parts):
        wanted = {p.strip() for p in parts}
        return catalog.REGION_JOIN.join(r for r in catalog.REGIONS if r in wanted), None
    if isinstance(parts, list) and parts:
        unknown = next((p for p in parts if not (isinstance(p, str) and p.strip() in catalog.REGIONS)), None)
        return _found(unknown, _REGIONS_ALLOWED, did_you_mean(unknown, catalog.REGIONS))
    return _found(raw, _REGIONS_ALLOWED, did_you_mean(raw, catalog.REGIONS))


_COERCE = {
    "model": _model,
    "size": _size,
    "n": _n,
    "seed": _seed,
    "negative_prompt": _text,
    "prompt_extend": _bool,
    "watermark": _bool,
    "region": _region,
    "sync": _bool,
}
