"""How a simulator is set up: one frozen, keyword-only :class:`SimConfig`.

Every knob has its default in the signature. A config file (YAML or JSON,
``SimConfig(config_file=...)`` or ``wanbatch sim --config``) adds accounts and
keys and may set any other field by name; a field set explicitly in the
:class:`SimConfig` wins over the file, the file wins over the default. The
file format is described in docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wanbatch import catalog
from wanbatch.sim.faults import FAULT_PROFILES, PROFILE_NEIGHBOURS, Fault

FAULT_ENDPOINTS = ("create", "sync", "query", "list", "cancel")

__all__ = ["ACCOUNT_REFUSALS", "DEMO_ACCOUNT", "DEMO_KEYS", "AccountConfig", "SimConfig", "read_config_file"]

#: The demo keys every simulator knows, one per region, all of one account.
DEMO_KEYS: Mapping[str, str] = {
    "sk-sim-beijing": "beijing",
    "sk-sim-singapore": "singapore",
    "sk-sim-virginia": "virginia",
}
DEMO_ACCOUNT = "demo"

_QUOTA_FIELDS = ("submit_rps", "concurrency")
_CHOICES = {
    "param_errors": ("submit", "task"),
    "duration_distribution": ("uniform", "lognormal", "fixed"),
    "multimodal_async_header": ("reject", "async"),
    "wan26_choices": ("one", "per_image"),
    "wan26_usage": ("size", "width_height"),
}

#: Account states that refuse every create: code -> (HTTP status, message), as spec §4 quotes them.
ACCOUNT_REFUSALS: Mapping[str, tuple[int, str]] = {
    "Arrearage": (400, "Access denied, please make sure your account is in good standing."),
    "AccessDenied.Unpurchased": (
        403,
        "Access to model denied. Please make sure you are eligible for using the model.",
    ),
    "AllocationQuota.FreeTierOnly": (
        403,
        "The free tier of the model has been exhausted. If you wish to continue access the model on a paid basis,"
        ' please disable the "use free tier only" mode in the management console.',
    ),
    "Throttling.AllocationQuota": (429, "Free allocated quota exceeded."),
    "CommodityNotPurchased": (429, "Commodity has not purchased yet."),
    "PrepaidBillOverdue": (429, "The prepaid bill is overdue."),
    "PostpaidBillOverdue": (429, "The postpaid bill is overdue."),
}

#: Per model (canonical name, or ``"*"`` for all): ``{"submit_rps": x, "concurrency": y}``; None = unlimited.
QuotaTable = Mapping[str, Mapping[str, float | None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountConfig:
    """An account of the simulated service: its keys (key -> region) and quota overrides."""

    name: str
    keys: Mapping[str, str]
    quotas: QuotaTable = field(default_factory=dict)
    uid: str = ""  #: the account's numeric id in list bodies; derived from the name when empty
    refusal: str = ""  #: an account-level error code every create of this account gets (see ACCOUNT_REFUSALS)

    def __post_init__(self) -> None:
        if self.refusal and self.refusal not in ACCOUNT_REFUSALS:
            raise ValueError(f"account {self.name}: refusal must be one of {', '.join(ACCOUNT_REFUSALS)}")
        for key, region in self.keys.items():
            if region not in catalog.REGIONS:
                raise ValueError(f"account {self.name}: key {key[:8]}… has unknown region {region!r}")
        _check_quotas(self.quotas, f"account {self.name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything a simulator needs; see docs/simulator.md for each field's meaning."""

    # --- what is served
    region: str = "beijing"
    accounts: tuple[AccountConfig, ...] = ()  #: added to the demo account
    config_file: Path | None = None

    # --- time
    speed: float = 1.0  #: simulated seconds per wall second
    seed: int = 0  #: makes durations, random seeds, failures and faults reproducible
    durations: float | Mapping[str, float] | None = None  #: mean task duration (s): one number, per model, or catalog
    duration_spread: float = 0.3  #: relative half-width (uniform) or sigma (lognormal) around the mean
    duration_distribution: str = "uniform"
    task_ttl_s: float = 86400.0  #: a task is UNKNOWN this long after it ends
    url_ttl_s: float = 86400.0  #: a result URL works this long after its task ends
    sync_timeout_s: float = 300.0  #: the sync endpoint answers 500 RequestTimeOut after this

    # --- quotas (per account, per model, in simulated time)
    quotas: QuotaTable = field(default_factory=dict)  #: overrides of the catalog's per-model quotas
    query_qps: float | None = 20.0  #: each of query, list and cancel; None = unlimited
    burst_idle_s: float | None = 60.0  #: idle time after which a burst is throttled; None = never
    burst_allowance: int = 3  #: submits accepted in the first second after an idle period
    retry_after_s: float | None = None  #: when set, 429 answers carry ``Retry-After``

    # --- outcomes and moderation
    image_failure_rate: float = 0.0  #: chance that one image of a task fails (partial failure)
    input_inspection_words: tuple[str, ...] = ("sim-inappropriate",)  #: -> 400 DataInspectionFailed
    ip_infringement_words: tuple[str, ...] = ("sim-trademark",)  #: -> 400 IPInfringementSuspect
    output_inspection_words: tuple[str, ...] = ("sim-unsafe-output",)  #: -> the task FAILED

    # --- choices for the spec's open questions (docs/simulator.md, "Open questions")
    param_errors: str = "submit"  #: "submit": 400 at once; "task": a task that FAILED
    pixel_floor_side: int | None = None  #: wan2.5/2.6 minimum area is this squared (768 or 1280); None = catalog
    prompt_max: Mapping[str, int] = field(default_factory=dict)  #: per-model prompt limit overrides
    accept_x_size: bool = False  #: accept "1024x1024" as well as "1024*1024"
    legacy_sync: bool = False  #: wan2.2 models answer text2image without the async header
    multimodal_async_header: str = "reject"  #: the sync endpoint given ``X-DashScope-Async: enable``
    wan26_choices: str = "one"  #: n images as one choice with n contents, or n choices
    wan26_usage: str = "size"  #: usage carries "size" (the docs) or width/height

    # --- faults
    faults: str = "none"  #: a name of FAULT_PROFILES
    fault_rates: Mapping[str, float] = field(default_factory=dict)  #: per-fault rates over the profile
    #: the API endpoints faults fall on (create, sync, query, list, cancel); empty: all of them
    fault_endpoints: tuple[str, ...] = ()
    hold_s: float = 30.0  #: how long a held response waits after the work is done
    slow_body_s: float = 5.0  #: how long a slow body or slow download takes to send
    storm_s: float = 5.0  #: how long a 429 storm lasts
    early_expiry_s: float = 120.0  #: URL lifetime after the task ends under the early-expiry fault
    late_create_max_s: float = 300.0  #: a late create lands up to this long after it was sent (the gateway's window)
    list_lag_s: float = 60.0  #: how long a lagging task stays out of the list
    young_task_s: float = 300.0  #: a task this young may be read as UNKNOWN once (query_unknown)

    # --- neighbours: other users of the same account (None: the fault profile's, 0 outside ``unkind``)
    neighbour_rate: float | None = None  #: chance that one of our creates has a neighbour with the same prompt
    neighbour_same_key_share: float = 0.5  #: share of those neighbours sending through our own key
    #: share of the background stream sent through our own key (its requests may look like ours; see the docs)
    neighbour_background_same_key_share: float = 0.0
    neighbour_window_s: float = 30.0  #: a neighbour is made at most this long before or after our create
    neighbour_background_rps: float | None = None  #: unrelated neighbour creates per second on the models we use

    # --- records
    billing_log: Path | None = None  #: one JSON line per billed image is appended here
    #: where the simulator keeps its tasks, clock and URL secret, and finds them when started again there
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.region not in catalog.REGIONS:
            raise ValueError(f"region must be one of {', '.join(catalog.REGIONS)}, got {self.region!r}")
        if self.speed <= 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.image_failure_rate <= 1.0:
            raise ValueError(f"image_failure_rate must be in [0, 1], got {self.image_failure_rate}")
        if self.pixel_floor_side not in (None, 768, 1280):
            raise ValueError(f"pixel_floor_side must be 768, 1280 or None (the catalog's), got {self.pixel_floor_side}")
        if self.burst_allowance < 1:
            raise ValueError(f"burst_allowance must be >= 1, got {self.burst_allowance}")
        if self.faults not in FAULT_PROFILES:
            raise ValueError(f"faults must be one of {', '.join(FAULT_PROFILES)}, got {self.faults!r}")
        unknown = set(self.fault_rates) - set(Fault)
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(Fault)}")
        unknown = set(self.fault_endpoints) - set(FAULT_ENDPOINTS)
        if unknown:
            raise ValueError(
                f"unknown fault endpoint(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULT_ENDPOINTS)}"
            )
        _check_quotas(self.quotas, "quotas")
        self._check_neighbours()
        means = self.durations.values() if isinstance(self.durations, Mapping) else [self.durations or 0.0]
        if any(m < 0 for m in means):
            raise ValueError("durations must be >= 0 seconds")

    def _check_neighbours(self) -> None:
        for name in ("neighbour_rate", "neighbour_same_key_share", "neighbour_background_same_key_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("neighbour_background_rps", "neighbour_window_s", "late_create_max_s", "list_lag_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def neighbours(self) -> tuple[float, float]:
        """(neighbour_rate, neighbour_background_rps): the fields, or the fault profile's where they are None."""
        rate, rps = PROFILE_NEIGHBOURS.get(self.faults, (0.0, 0.0))
        return (
            rate if self.neighbour_rate is None else self.neighbour_rate,
            rps if self.neighbour_background_rps is None else self.neighbour_background_rps,
        )

    def mean_duration_s(self, model: catalog.Model) -> float:
        """The configured mean time a task of ``model`` runs."""
        if self.durations is None:
            return model.typical_duration_s
        if isinstance(self.durations, Mapping):
            return float(self.durations.get(model.name, self.durations.get("*", model.typical_duration_s)))
        return float(self.durations)

    def resolved(self) -> SimConfig:
        """This config with its ``config_file`` read in (fields left at their default take the file's value)."""
        if self.config_file is None:
            return self
        data = read_config_file(Path(self.config_file))
        known = {account.name for account in self.accounts}  # resolving twice adds nothing twice
        accounts = tuple(
            _account(name, spec) for name, spec in (data.pop("accounts", None) or {}).items() if name not in known
        )
        changes: dict[str, Any] = {"accounts": self.accounts + accounts}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name, value in data.items():
            if name not in fields or name in ("config_file", "accounts"):
                raise ValueError(f"{self.config_file}: unknown setting {name!r}")
            if getattr(self, name) == _default(fields[name]):
                changes[name] = _coerce(name, value)
        return dataclasses.replace(self, **changes)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(name: str, value: Any) -> Any:
    """File values into the field's type where YAML cannot say it (paths, tuples)."""
    if name in ("billing_log", "state_dir") and value is not None:
        return Path(value)
    if name.endswith("_words"):
        return tuple(value)
    if name == "quotas":
        return {model: _quota_values(spec) for model, spec in value.items()}
    return value


def _quota_values(spec: Mapping[str, Any]) -> dict[str, float | None]:
    """``"unlimited"`` (or null) means no limit."""
    return {k: None if v in (None, "unlimited") else v for k, v in spec.items()}


def _account(name: str, spec: Mapping[str, Any]) -> AccountConfig:
    quotas = {model: _quota_values(q) for model, q in (spec.get("quotas") or {}).items()}
    return AccountConfig(
        name=str(name),
        keys=dict(spec["keys"]),
        quotas=quotas,
        uid=str(spec.get("uid", "")),
        refusal=str(spec.get("refusal", "")),
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a config file holds, as written (YAML, or JSON when named ``*.json``)."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of settings")
    return data


def _check_quotas(quotas: QuotaTable, where: str) -> None:
    for model, spec in quotas.items():
        if model != "*" and model not in catalog.MODELS:
            raise ValueError(f"{where}: unknown model {model!r} (use a canonical name or '*')")
        for key, value in spec.items():
            if key not in _QUOTA_FIELDS:
                raise ValueError(f"{where}.{model}: unknown quota {key!r} (allowed: {', '.join(_QUOTA_FIELDS)})")
            if value is not None and value <= 0:
                raise ValueError(f"{where}.{model}.{key} must be > 0 or unlimited, got {value}")
