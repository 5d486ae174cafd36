"""The errors wanbatch raises, as one tree.

    WanbatchError
    ├── ManifestError          bad input: names file:line, field, found, allowed
    │   └── ManifestInvalid    all the errors found in one manifest, each a ManifestError
    ├── ConfigError            bad command line or environment (a missing key, a plain-HTTP remote URL)
    ├── LedgerError
    │   ├── IllegalTransition  a state move the table does not allow
    │   └── RunLocked          another run holds the run folder
    ├── ApiError               the service answered with an error (HTTP status, code, message, request_id)
    │   ├── ThrottledError     429 Throttling*: retry later, more slowly
    │   ├── AccountError       InvalidApiKey, Arrearage, AccessDenied*: stop submitting what it affects
    │   └── RejectedError      content moderation or an invalid request: final for the item
    ├── TransportError         no usable answer came back
    │   └── OutcomeUnknown     the request may have reached the service (timeout or reset after sending)
    └── DownloadError          an image could not be fetched or failed verification
        └── UrlExpired         the result URL is past its life: the image is lost

aiohttp's exceptions are mapped to these in one place, ``wanbatch.service.client``.
Each error says whether retrying may help (``retryable``); for the service's
errors that is decided by its ``code``, not its HTTP status.
"""

from __future__ import annotations

__all__ = [
    "AccountError",
    "ApiError",
    "ConfigError",
    "DownloadError",
    "IllegalTransition",
    "LedgerError",
    "ManifestError",
    "ManifestInvalid",
    "OutcomeUnknown",
    "RejectedError",
    "RunLocked",
    "ThrottledError",
    "TransportError",
    "UrlExpired",
    "WanbatchError",
    "classify_api_error",
]


class WanbatchError(Exception):
    """The root of every error wanbatch raises on purpose."""

    retryable: bool = False


class ManifestError(WanbatchError):
    """A manifest that cannot run. Nothing has been sent when this is raised."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None, field: str = "") -> None:
        self.path, self.line, self.field, self.detail = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        prefix = ": ".join(part for part in (where, field) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ManifestInvalid(ManifestError):
    """Every error found in a manifest (up to a cap), so that one edit can fix them all."""

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


class LedgerError(WanbatchError):
    """The ledger cannot do what was asked."""


class IllegalTransition(LedgerError):
    """An item was asked to move between two states that the table does not join."""


class RunLocked(LedgerError):
    """Another live process is running in this run folder."""


class ApiError(WanbatchError):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "", *, retryable: bool = False) -> None:
        self.status, self.code, self.message, self.request_id = status, code, message, request_id
        self.retryable = retryable
        super().__init__(f"HTTP {status} {code}: {message}" + (f" (request_id {request_id})" if request_id else ""))


class ThrottledError(ApiError):
    """429 Throttling*: the account's quota was exceeded; slow down and retry."""


class AccountError(ApiError):
    """The key or account cannot submit (InvalidApiKey, Arrearage, AccessDenied*)."""


class RejectedError(ApiError):
    """The request itself is refused for good: moderation or invalid parameters."""


class TransportError(WanbatchError):
    """No usable answer: connection refused or reset, a timeout, a broken body."""

    retryable = True


class OutcomeUnknown(TransportError):
    """The request may have been acted on: reconcile before sending it again."""


class DownloadError(WanbatchError):
    """An image could not be fetched, or what came back is not the image asked for."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        self.retryable = retryable
        super().__init__(message)


class UrlExpired(DownloadError):
    """The result URL no longer serves the image."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


_ACCOUNT_CODES = (
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
)
_RETRY_CODES = ("InternalError", "SystemError", "RequestTimeOut", "ModelServingError", "ModelUnavailable")


def classify_api_error(status: int, code: str, message: str, request_id: str = "") -> ApiError:
    """The error for a service error body, its class and retryability decided by ``code``."""
    if code in _ACCOUNT_CODES or code.startswith("AccessDenied"):
        return AccountError(status, code, message, request_id)
    if code.startswith("Throttling") or status == 429:  # a 429 whose body did not parse is a throttle too
        return ThrottledError(status, code, message, request_id, retryable=True)
    if code.split(".")[0] in _RETRY_CODES or status >= 500:
        return ApiError(status, code, message, request_id, retryable=True)
    return RejectedError(status, code, message, request_id)
