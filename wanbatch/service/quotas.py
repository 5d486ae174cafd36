"""The quotas an account was granted, where they differ from the catalog's defaults.

The service sells each model with a default submit rate and concurrency (the
catalog); an account can have them raised. The service does not say what an
account has, so the user does, once per account, in a small YAML file
(``wanbatch run --quotas FILE``)::

    wan2.2-t2i-flash: {submit_rps: 10, concurrency: 8}
    "*": {concurrency: 4}          # every model not named

A model is named by its canonical name or a region's name for it; a model or
a field left out keeps the catalog's value. The shape, ``{model: {submit_rps,
concurrency}}``, is the one an account of a pool carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from wanbatch import catalog
from wanbatch.errors import ManifestError, ManifestInvalid
from wanbatch.manifest.yamlsrc import Node, Origin, kind_of, load_yaml

__all__ = ["QUOTA_FIELDS", "QuotaTable", "apply_quotas", "check_quotas", "load_quotas", "quota_table"]

#: Per model (canonical name, or ``"*"`` for every model): ``{"submit_rps": x, "concurrency": y}``.
QuotaTable = Mapping[str, Mapping[str, float]]
QUOTA_FIELDS = ("submit_rps", "concurrency")
_ALLOWED_MODELS = "a model of the catalog (" + ", ".join(catalog.MODELS) + ") or '*'"


def load_quotas(path: str | Path) -> dict[str, dict[str, float]]:
    """The quota table in ``path``; raises :class:`ManifestInvalid` naming file:line of every error."""
    path = Path(path)
    display = path.as_posix()
    if not path.is_file():
        raise ManifestError("no such file; allowed: a YAML file of quotas per model", path=display)
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ManifestError("the file is empty; allowed: a mapping of model to {submit_rps, concurrency}", path=display)
    root, errors = load_yaml(path, display)
    table = quota_table(root, errors) if root is not None else {}
    if errors:
        raise ManifestInvalid(errors, manifest=display)
    return table


def check_quotas(quotas: QuotaTable, *, where: str = "quotas") -> dict[str, dict[str, float]]:
    """A quota table given in code, checked as a file would be; model names made canonical."""
    errors: list[ManifestError] = []
    table = quota_table(_node(quotas, Origin(where, 0, "")), errors, line=False)
    if errors:
        raise ManifestInvalid(errors, manifest=where)
    return table


def apply_quotas(offer: catalog.Offer, quotas: QuotaTable) -> catalog.Offer:
    """``offer`` with the account's quotas for its model (its own entry, else ``"*"``, else the catalog's)."""
    spec = {**quotas.get("*", {}), **quotas.get(offer.model.name, {})}
    if not spec:
        return offer
    return dataclasses.replace(
        offer,
        submit_rps=float(spec.get("submit_rps", offer.submit_rps)),
        concurrency=int(spec.get("concurrency", offer.concurrency)),
    )


def quota_table(root: Node, errors: list[ManifestError], *, line: bool = True) -> dict[str, dict[str, float]]:
    """The quota table a loaded YAML node holds (an accounts file's ``quotas:`` too); its errors appended to
    ``errors``, each naming file:line (``line``) and field."""

    def error(origin: Origin, message: str) -> None:
        errors.append(ManifestError(message, path=origin.file, line=origin.line if line else None, field=origin.field))

    if not isinstance(root.value, dict):
        error(root.origin, f"found {root.kind}; allowed: a mapping of model to {{submit_rps, concurrency}}")
        return {}
    table: dict[str, dict[str, float]] = {}
    for name, spec in root.value.items():
        model = _canonical(name)
        if model is None:
            error(spec.origin, f"found an unknown model {name!r}; allowed: {_ALLOWED_MODELS}")
            continue
        if not isinstance(spec.value, dict):
            error(spec.origin, f"found {spec.kind}; allowed: a mapping with submit_rps and/or concurrency")
            continue
        if model in table:
            error(spec.origin, f"found {model} a second time (as {name!r}); allowed: each model once, by any one name")
            continue
        table[model] = {}
        for key, value in spec.value.items():
            problem = _value_problem(key, value.value)
            if problem:
                error(value.origin, problem)
            else:
                table[model][key] = value.value
    return table


def _value_problem(key: str, value: object) -> str | None:
    if key not in QUOTA_FIELDS:
        return f"found an unknown quota {key!r}; allowed: {', '.join(QUOTA_FIELDS)}"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key == "concurrency" and not (number and float(value).is_integer() and value >= 1):
        return f"found {kind_of(value)}; allowed: a whole number of tasks at once, at least 1"
    if key == "submit_rps" and not (number and 0 < value < float("inf")):
        return f"found {kind_of(value)}; allowed: a number of requests per second above 0"
    return None


def _node(value: object, origin: Origin) -> Node:
    """``value`` as the tree a file would load into, for a table given in code (it has no lines)."""
    if isinstance(value, Mapping):
        return Node({str(k): _node(v, origin.child(str(k))) for k, v in value.items()}, origin)
    return Node(value, origin)


def _canonical(name: str) -> str | None:
    """The catalog's name of the model a region calls ``name``; ``"*"`` as it is."""
    if name == "*" or name in catalog.MODELS:
        return name
    return next((o.model.name for r in catalog.REGIONS for o in catalog.offers_in(r) if o.api_name == name), None)
