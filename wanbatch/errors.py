"""The errors wanbatch raises, as one tree.

    WanbatchError
    ├── ManifestError          bad input: names file:line, field, found, allowed
    │   └── ManifestInvalid    all the errors found in one manifest, each a ManifestError
    ├── ConfigError            bad command line or environment (a missing key, a plain-HTTP remote URL)
    │   └── BudgetExceeded     the plan costs more than the budget: nothing was sent
    ├── LedgerError
    │   ├── IllegalTransition  a state move the table does not allow
    │   │   └── LeaseLost      a worker of a shared ledger moved an item another worker has taken over
    │   └── RunLocked          another run holds the run folder
    ├── ApiError               the service answered with an error (HTTP status, code, message, request_id)
    │   ├── ThrottledError     429 Throttling*: retry later, more slowly
    │   ├── AccountError       InvalidApiKey, Arrearage, AccessDenied*: stop submitting what it affects
    │   └── RejectedError      content moderation or an invalid request: final for the item
    ├── TransportError         no usable answer came back
    │   └── OutcomeUnknown     the request may have reached the service (timeout or reset after sending)
    ├── MalformedAnswer        an answer that cannot be read as the protocol says: ask again, do not act on it
    ├── DownloadError          an image could not be fetched or failed verification
    │   └── UrlExpired         the result URL is past its life: the image is lost
    └── StoreError             the output store did not take or confirm an object (down, refusing, a wrong answer)
        └── StoreConfigError   no such bucket, refused credentials: also a ConfigError; the user fixes it

aiohttp's exceptions are mapped to these in one place, ``wanbatch.service.client``; the
output stores' (fsspec, s3fs, ossfs, the disk) in ``wanbatch.outputs.stores``.
Each error says whether retrying may help (``retryable``); for the service's
errors that is decided by its ``code``, not its HTTP status, through the one
table of codes below (:func:`classify_api_error`, :func:`proves_no_task`).
Each error also says what the user can do next (``advice``, empty when its
message says it already): the command line prints it, the engine logs it.
"""

from __future__ import annotations

__all__ = [
    "ACCOUNT_CODES",
    "HALTING_CODES",
    "HELD_CODES",
    "KEY_WIDE_CODES",
    "MODERATION_CODES",
    "NOT_CANCELABLE",
    "RETRY_CODES",
    "UNREACHABLE",
    "WRITE_OFF_CODES",
    "AccountError",
    "ApiError",
    "BudgetExceeded",
    "ConfigError",
    "DownloadError",
    "IllegalTransition",
    "LeaseLost",
    "LedgerError",
    "MalformedAnswer",
    "ManifestError",
    "ManifestInvalid",
    "OutcomeUnknown",
    "RejectedError",
    "RunLocked",
    "StoreConfigError",
    "StoreError",
    "ThrottledError",
    "TransportError",
    "UrlExpired",
    "WanbatchError",
    "classify_api_error",
    "proves_no_task",
]

# ── The error codes, by what each means for a batch ─────────────────────────────────────────────
# The service's (spec §4):

#: The key or the account cannot submit (:class:`AccountError`; every ``AccessDenied*`` too).
ACCOUNT_CODES = frozenset(
    {
        "InvalidApiKey",
        "Arrearage",
        "AccessDenied",
        "Model.AccessDenied",
        "Workspace.AccessDenied",
        "AllocationQuota.FreeTierOnly",
        "CommodityNotPurchased",
        "PrepaidBillOverdue",
        "PostpaidBillOverdue",
        "WorkSpaceNotFound",
    }
)
#: Of those, the ones that stop every model of the key's region, not only the model that met them.
KEY_WIDE_CODES = frozenset({"InvalidApiKey", "Arrearage", "PrepaidBillOverdue", "PostpaidBillOverdue"})
#: The service failed inside (the code's first dotted part): asking again may pass. Like any 5xx, such an
#: answer to a create proves nothing: every other 4xx refusal, and every 429, proves that no task was made.
RETRY_CODES = frozenset({"InternalError", "SystemError", "RequestTimeOut", "ModelServingError", "ModelUnavailable"})
#: Content moderation's refusals: final, and sent again only when asked for by name (``--retry-moderated``).
MODERATION_CODES = frozenset({"DataInspectionFailed", "IPInfringementSuspect"})
#: A task that has started refuses to be canceled with this (it is being paid for: it is saved instead).
NOT_CANCELABLE = "UnsupportedOperation"

# wanbatch's own, in the ledger and the report:

#: No connection reaches the service, many times in a row: its lane stops.
UNREACHABLE = "Unreachable"
#: What stops a whole batch (exit 4): the key, the account's standing, or a service that cannot be reached.
HALTING_CODES = KEY_WIDE_CODES | {UNREACHABLE}
#: An item possibly billed whose images were never had: counted as paid and lost.
WRITE_OFF_CODES = frozenset({"TaskExpired", "SyncAnswerLost", "MalformedAnswer", "OutcomeUnknown"})
#: Why an unknown item is held for the user instead of decided.
HELD_CODES = frozenset({"HeldAmbiguous", "HeldUndecided", "HeldUnknownTwice"})


class WanbatchError(Exception):
    """The root of every error wanbatch raises on purpose."""

    retryable: bool = False
    #: What the user can do next, when the message does not say it already.
    advice: str = ""


class ManifestError(WanbatchError):
    """A manifest that cannot run. Nothing has been sent when this is raised."""

    advice = "nothing was sent."

    def __init__(self, message: str, *, path: str = "", line: int | None = None, field: str = "") -> None:
        self.path, self.line, self.field, self.detail = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        prefix = ": ".join(part for part in (where, field) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ManifestInvalid(ManifestError):
    """Every error found in a manifest (up to a cap), so that one edit can fix them all."""

    advice = ""  # its first line says that nothing was sent

    def __init__(self, errors: list[ManifestError], *, manifest: str = "", truncated: bool = False) -> None:
        self.errors, self.truncated = list(errors), truncated
        first = self.errors[0] if self.errors else ManifestError("the manifest is invalid")
        count = f"{len(self.errors)}{'+' if truncated else ''} error{'s' if len(self.errors) != 1 else ''}"
        lines = [f"{manifest or first.path or 'manifest'}: {count}, nothing was sent:"]
        lines += [f"  {error}" for error in self.errors]
        if truncated:
            lines.append("  (stopped counting; fix these and run again)")
        ManifestError.__init__(self, "\n".join(lines))
        self.path, self.line, self.field, self.detail = first.path, first.line, first.field, first.detail


class ConfigError(WanbatchError):
    """The command line or environment is not usable as given."""


class BudgetExceeded(ConfigError):
    """The manifest's plan costs more than its budget: nothing was sent."""


class LedgerError(WanbatchError):
    """The ledger cannot do what was asked."""


class IllegalTransition(LedgerError):
    """An item was asked to move between two states that the table does not join."""


class LeaseLost(IllegalTransition):
    """This worker of a shared ledger was silent past its lease and another took its items over: it must stop."""


class RunLocked(LedgerError):
    """Another live process is running in this run folder."""


class ApiError(WanbatchError):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "", *, retryable: bool = False) -> None:
        self.status, self.code, self.message, self.request_id = status, code, message, request_id
        self.retryable = retryable
        super().__init__(f"HTTP {status} {code}: {message}" + (f" (request_id {request_id})" if request_id else ""))

    @property
    def advice(self) -> str:
        if self.code == UNREACHABLE:  # the lane stopped: no answer came back, many times in a row
            return "Check the network and the base URL, then run again: unsubmitted items stay planned."
        return ""


class ThrottledError(ApiError):
    """429 Throttling*: the account's quota was exceeded; slow down and retry."""


class AccountError(ApiError):
    """The key or account cannot submit (InvalidApiKey, Arrearage, AccessDenied*)."""

    @property
    def advice(self) -> str:
        if self.code == "InvalidApiKey":
            return "Check the key for this region (DASHSCOPE_API_KEY, DASHSCOPE_API_KEY_SINGAPORE, ...)."
        if self.code in KEY_WIDE_CODES:  # the account's standing: its billing
            return "Top up the account, then run again: unsubmitted items stay planned."
        return "Check that the account may use this model in this region, then run again."


class RejectedError(ApiError):
    """The request itself is refused for good: moderation or invalid parameters."""


class TransportError(WanbatchError):
    """No usable answer: connection refused or reset, a timeout, a broken body."""

    retryable = True


class OutcomeUnknown(TransportError):
    """The request may have been acted on: reconcile before sending it again."""


class MalformedAnswer(WanbatchError):
    """A task body that cannot be read as the protocol says: ask again rather than act on it."""


class DownloadError(WanbatchError):
    """An image could not be fetched, or what came back is not the image asked for."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class UrlExpired(DownloadError):
    """The result URL no longer serves the image."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class StoreError(WanbatchError):
    """The output store did not take an object, or did not prove it holds it whole; the bytes are kept to retry."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class StoreConfigError(StoreError, ConfigError):
    """The store cannot be used as configured: its bucket does not exist or it refuses our credentials."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def classify_api_error(status: int, code: str, message: str, request_id: str = "") -> ApiError:
    """The error for a service error body, its class and retryability decided by ``code``."""
    if code in ACCOUNT_CODES or code.startswith("AccessDenied"):
        return AccountError(status, code, message, request_id)
    if code.startswith("Throttling") or status == 429:  # a 429 whose body did not parse is a throttle too
        return ThrottledError(status, code, message, request_id, retryable=True)
    if code.split(".")[0] in RETRY_CODES or status >= 500:
        return ApiError(status, code, message, request_id, retryable=True)
    return RejectedError(status, code, message, request_id)


def proves_no_task(status: int, code: object) -> bool:
    """Whether an error answer to a create is the service's refusal, which proves that no task was made: a 429,
    or a 4xx whose code refuses the request (a 4xx saying it timed out or failed inside proves nothing)."""
    if status == 429:
        return True
    if not (400 <= status < 500 and isinstance(code, str) and code):
        return False
    return not classify_api_error(status, code, "").retryable
