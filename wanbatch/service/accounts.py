"""An account pool: the DashScope accounts one batch runs over (``wanbatch run --accounts FILE``).

The service's quotas are per account and model, so one account bounds a batch; a pool of accounts multiplies
it. The file names each account, its region and the environment variable that holds its key, never the key::

    accounts:
      - {name: team-a, region: beijing, key_env: DASHSCOPE_KEY_TEAM_A}
      - {name: team-b, region: beijing, key_env: DASHSCOPE_KEY_TEAM_B,
         quotas: {wan2.2-t2i-flash: {submit_rps: 4, concurrency: 4}}}
      - {name: intl, region: singapore, key_env: DASHSCOPE_KEY_INTL}

An account's ``quotas`` are those it was granted where they differ from the catalog's (the shape of
:mod:`wanbatch.service.quotas`); a model it names must be offered in its region. Every error names file:line,
the field, what was found and what is allowed, all at once; a key written into the file is refused without
being shown. Whether each ``key_env`` is set is asked only when the keys are wanted (a run, not a plan).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanbatch import catalog
from wanbatch.errors import ConfigError, ManifestError, ManifestInvalid
from wanbatch.manifest.yamlsrc import Node, load_yaml
from wanbatch.service.quotas import QuotaTable, apply_quotas, quota_table

__all__ = ["Account", "AccountSpec", "Pool", "check_pool_serves", "load_accounts", "split_plan"]

ACCOUNT_FIELDS = ("name", "region", "key_env", "quotas")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ALLOWED_NAME = "a name of letters, digits, '-', '_' or '.' (up to 64), starting with a letter or digit"
_SHAPE = "a mapping with one key, accounts: a list of {name, region, key_env, quotas}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountSpec:
    """One account as the file names it (no key)."""

    name: str
    region: str
    key_env: str  #: the environment variable that holds its key
    quotas: QuotaTable = field(default_factory=dict)  #: where they differ from the catalog's
    source: str = ""  #: file:line of its entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """One account as a run uses it: its name, region, key and quotas. The key is never shown (see ``repr``)."""

    name: str  #: '' for the environment's key of ``region`` (a run without a pool)
    region: str
    key: str = field(repr=False)
    quotas: QuotaTable = field(default_factory=dict)

    @property
    def scope(self) -> str:
        """What the service's quotas and task list belong to: the account's name, or the region of an
        environment key (a run without a pool has one key per region)."""
        return self.name or self.region


@dataclass(frozen=True, slots=True, kw_only=True)
class Pool:
    """The accounts of a file, in its order."""

    accounts: tuple[AccountSpec, ...]
    path: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.accounts)

    def regions(self) -> list[str]:
        """The regions the pool serves, sorted."""
        return sorted({spec.region for spec in self.accounts})

    def serving(self, region: str, model: str) -> list[AccountSpec]:
        """The accounts that can make ``model`` for items of ``region`` (a manifest's region value: one region,
        several joined by ``|``, or ``any``): those of each allowed region that sells the model."""
        regions = {offer.region for offer in catalog.offers_for(region, model)}
        return [spec for spec in self.accounts if spec.region in regions]

    def resolve(self, environ: Mapping[str, str], *, keys: Mapping[str, str] | None = None) -> list[Account]:
        """Every account with its key: ``keys`` (name -> key) where given, else its ``key_env`` in ``environ``;
        raises :class:`ConfigError` naming each account whose variable is not set (never a value)."""
        accounts, missing = [], []
        for spec in self.accounts:
            key = (keys or {}).get(spec.name) or environ.get(spec.key_env, "")
            if key:
                accounts.append(Account(name=spec.name, region=spec.region, key=key, quotas=spec.quotas))
            else:
                missing.append(f"{spec.source}: account {spec.name}: {spec.key_env} is not set in the environment")
        if missing:
            raise ConfigError(
                "no key for "
                + str(len(missing))
                + " account(s) of the pool:\n  "
                + "\n  ".join(missing)
                + "\nset each variable to the account's API key (or use --simulate, which gives each a demo key)"
            )
        return accounts


def check_pool_serves(pool: Pool, plan: Mapping[str, Any]) -> None:
    """Refuse a manifest whose items go to a region where the pool has no account (``plan``: make_plan's)."""
    lacking = sorted(
        {(lane["region"], lane["model"]) for lane in plan["lanes"] if not pool.serving(lane["region"], lane["model"])}
    )
    if lacking:
        named = ", ".join(f"{model} in {region}" for region, model in lacking)
        raise ConfigError(
            f"{pool.path or 'the accounts'}: no account of the pool serves {named}; add an account of that region "
            "to the file, or send those items elsewhere"
        )


#: Said wherever the split is shown: the pool's reader sends each item to the account free at that moment.
SPLIT_NOTE = (
    "an estimate: items go to whichever account has free quota when each is sent, here in proportion to each "
    "account's throughput for the model (min of its submit rate and concurrency / typical task time)"
)


def split_plan(plan: Mapping[str, Any], pool: Pool) -> dict[str, Any]:
    """``plan`` (make_plan's) with its split over the pool's accounts: per account and model the items, images
    and cost it is expected to take (in proportion to its throughput for the model), and the time the pool's
    quotas allow (each (region, model) over the sum of its accounts' throughputs)."""
    rows = []
    bound_s = 0.0
    for lane in plan["lanes"]:
        serving = pool.serving(lane["region"], lane["model"])
        rates = {spec.name: _throughput(spec, spec.region, lane["model"]) for spec in serving}
        total = sum(rates.values())
        if not total:
            continue
        bound_s = max(bound_s, lane["items"] / total)
        for spec in serving:
            share = rates[spec.name] / total
            price = catalog.offer(spec.region, lane["model"]).price  # items are priced where they are sent
            rows.append(
                {
                    "account": spec.name,
                    "region": spec.region,
                    "model": lane["model"],
                    "items": round(lane["items"] * share, 1),
                    "images": round(lane["images"] * share, 1),
                    "cost": round(lane["images"] * share * price, 6),
                    "currency": lane["currency"],
                    "items_per_s": round(rates[spec.name], 4),
                }
            )
    cost: dict[str, float] = {}
    for row in rows:
        cost[row["currency"]] = round(cost.get(row["currency"], 0.0) + row["cost"], 6)
    return {**plan, "accounts": rows, "accounts_note": SPLIT_NOTE, "quota_time_s": bound_s, "cost_by_split": cost}


def _throughput(spec: AccountSpec, region: str, model: str) -> float:
    """Items per second ``spec``'s quotas allow for ``model``: its submit rate, or its concurrency over the
    model's typical task time, whichever is lower."""
    offer = apply_quotas(catalog.offer(region, model), spec.quotas)
    return min(offer.submit_rps, offer.concurrency / offer.model.typical_duration_s)


def load_accounts(path: str | Path) -> Pool:
    """The pool in ``path``; raises :class:`ManifestInvalid` naming file:line and field of every error."""
    path = Path(path)
    display = path.as_posix()
    if not path.is_file():
        raise ManifestError(f"no such file; allowed: a YAML file of {_SHAPE}", path=display)
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ManifestError(f"the file is empty; allowed: {_SHAPE}", path=display)
    root, errors = load_yaml(path, display)
    accounts: list[AccountSpec] = []
    if root is not None:
        accounts = _accounts(root, errors)
    if errors:
        raise ManifestInvalid(errors, manifest=display)
    return Pool(accounts=tuple(accounts), path=display)


def _error(errors: list[ManifestError], node: Node, message: str) -> None:
    origin = node.origin
    errors.append(ManifestError(message, path=origin.file, line=origin.line, field=origin.field or "(top level)"))


def _accounts(root: Node, errors: list[ManifestError]) -> list[AccountSpec]:
    if not isinstance(root.value, dict):
        _error(errors, root, f"found {root.kind}; allowed: {_SHAPE}")
        return []
    for key, value in root.value.items():
        if key != "accounts":
            _error(errors, value, f"found an unknown field {key!r}; allowed: accounts")
    listed = root.value.get("accounts")
    if listed is None:
        _error(errors, root, f"found no accounts; allowed: {_SHAPE}")
        return []
    if not isinstance(listed.value, list) or not listed.value:
        found = "an empty list" if listed.value == [] else listed.kind
        _error(errors, listed, f"found {found}; allowed: a list of at least one {{name, region, key_env}}")
        return []
    accounts: list[AccountSpec] = []
    names: dict[str, str] = {}
    envs: dict[str, str] = {}
    for entry in listed.value:
        # Names and variables are checked for repeats even on an entry with other errors: all are said at once.
        raw = entry.value if isinstance(entry.value, dict) else {}
        repeated = False
        for key, seen, what in (("name", names, "the name"), ("key_env", envs, "the variable")):
            node = raw.get(key)
            if node is None or not isinstance(node.value, str):
                continue
            if node.value in seen:
                repeated = True
                _error(errors, node, _repeat_message(key, node.value, seen[node.value], what))
            else:
                owner = raw["name"].value if "name" in raw else "?"
                seen[node.value] = entry.origin.where() if key == "name" else str(owner)
        spec = _account(entry, errors)
        if spec is not None and not repeated:
            accounts.append(spec)
    return accounts


def _repeat_message(key: str, value: str, first: str, what: str) -> str:
    if key == "name":
        return f"found {what} {value!r} a second time (first at {first}); allowed: each name once"
    return (
        f"found {value}, which account {first} uses already; allowed: a variable of the account's own "
        "(one key is one account: its quota would be counted twice)"
    )


def _account(entry: Node, errors: list[ManifestError]) -> AccountSpec | None:
    """One entry of the list, or None when it has errors (all of them appended)."""
    if not isinstance(entry.value, dict):
        _error(errors, entry, f"found {entry.kind}; allowed: a mapping {{name, region, key_env, quotas}}")
        return None
    count = len(errors)
    fields: dict[str, Node] = entry.value
    for key, value in fields.items():
        if key == "key" or key.endswith("api_key"):
            # The value is a secret: neither echoed nor kept; the user is told where it is and what to write.
            _error(
                errors,
                value,
                "found an API key written in the file (not shown); allowed: key_env, the name of an environment "
                "variable that holds it. Remove the key from the file (and from its history) and set the variable",
            )
        elif key not in ACCOUNT_FIELDS:
            _error(errors, value, f"found an unknown field {key!r}; allowed: {', '.join(ACCOUNT_FIELDS)}")
    for required in ("name", "region", "key_env"):
        if required not in fields:
            _error(errors, entry, f"found no {required}; allowed: an account has name, region and key_env")
    name, region, key_env = fields.get("name"), fields.get("region"), fields.get("key_env")
    if name is not None and not (isinstance(name.value, str) and _NAME.fullmatch(name.value)):
        _error(errors, name, f"found {name.kind}; allowed: {_ALLOWED_NAME}")
    if region is not None and region.value not in catalog.REGIONS:
        _error(errors, region, f"found {region.kind}; allowed: one of {', '.join(catalog.REGIONS)}")
    if key_env is not None and not (isinstance(key_env.value, str) and _ENV_NAME.fullmatch(key_env.value)):
        # Not echoed: what is written where a variable's name belongs may be the key itself.
        _error(
            errors,
            key_env,
            "found something that is not an environment variable's name (not shown: it may be a key); "
            "allowed: a name such as DASHSCOPE_KEY_TEAM_A",
        )
    quotas = _quotas(fields.get("quotas"), region.value if region is not None else None, errors)
    if len(errors) > count:
        return None
    return AccountSpec(
        name=name.value,
        region=region.value,
        key_env=key_env.value,
        quotas=quotas,
        source=entry.origin.where(),
    )


def _quotas(node: Node | None, region: str | None, errors: list[ManifestError]) -> dict[str, dict[str, float]]:
    """The account's quota table; a model its region does not offer is refused."""
    if node is None:
        return {}
    table = quota_table(node, errors)
    if region not in catalog.REGIONS or not isinstance(node.value, dict):
        return table
    offered = [offer.model.name for offer in catalog.offers_in(region)]
    for written, spec in node.value.items():
        model = next((m for m in table if m != "*" and (m == written or _named(m, written))), None)
        if model is not None and model not in offered:
            _error(
                errors,
                spec,
                f"found quotas for {model}, which {region} does not offer; allowed: a model of {region} "
                f"({', '.join(offered)}) or '*'",
            )
    return table


def _named(model: str, written: str) -> bool:
    """Whether ``written`` is a region's name for the catalog's ``model``."""
    return any(o.api_name == written and o.model.name == model for r in catalog.REGIONS for o in catalog.offers_in(r))
