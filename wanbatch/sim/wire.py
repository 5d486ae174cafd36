"""The service's error codes and messages, and its time formats.

Messages are byte-for-byte those quoted in shared/reference/dashscope-wan-t2i-api.md
§4 (misspellings included: "occured"); the ones the spec does not quote are
ours and say what is wrong and what is allowed.
"""

from __future__ import annotations

import datetime as dt
import uuid

__all__ = ["SimError", "format_time", "new_request_id", "parse_list_time"]

#: The service prints task times in UTC+8 whatever the region.
SERVICE_TZ = dt.timezone(dt.timedelta(hours=8))

NO_API_KEY = "No API-key provided."
INVALID_API_KEY = "Invalid API-key provided."
SYNC_NOT_SUPPORTED = "current user api does not support synchronous calls."
ASYNC_NOT_SUPPORTED = "Current user api does not support asynchronous calls."
MODEL_NOT_EXIST = "Model not exist."
URL_ERROR = "url error, please check url!"
ILLEGAL_INPUT = "The input parameter requires json format."
EMPTY_MODEL = 'Required parameter "model" missing from request.'
EMPTY_INPUT = "Required input parameter missing from request."
CANCEL_NOT_PENDING = "Failed to cancel the task, please confirm if the task is in PENDING status."
RATE_QUOTA = "Requests rate limit exceeded, please try again later."
BURST_RATE = (
    "Request rate increased too quickly. To ensure system stability, please adjust your client logic"
    " to scale requests more smoothly over time."
)
INPUT_INSPECTION = "Input data may contain inappropriate content."
OUTPUT_INSPECTION = "Output data may contain inappropriate content."
IP_INFRINGEMENT = "Input data is suspected of being involved in IP infringement."
INTERNAL_ERROR = "An internal error has occured, please try again later or contact service support."
INTERNAL_TIMEOUT = (
    "An internal timeout error has occured during execution, please try again later or contact service support."
)
MODEL_SERVING = (
    "Too many requests. Your requests are being throttled due to system capacity limits. Please try again later."
)
REQUEST_TIMEOUT = "Request timed out, please try again later."
SYSTEM_ERROR = "An system error has occured, please try again later."

#: HTTP status for a code carried by a failed sync call (async tasks report it inside a 200 body).
STATUS_OF_CODE = {"DataInspectionFailed": 400, "IPInfringementSuspect": 400, "InvalidParameter": 400}


#: The 5xx answers a create may get after the service has made its task (§4: InternalError, SystemError,
#: RequestTimeOut, ModelServingError): (status, code, message).
ERRORS_AFTER_CREATE = (
    (500, "InternalError", INTERNAL_ERROR),
    (500, "SystemError", SYSTEM_ERROR),
    (500, "RequestTimeOut", REQUEST_TIMEOUT),
    (503, "ModelServingError", MODEL_SERVING),
)


class SimError(Exception):
    """An error answer: HTTP status, the service's code and message.

    ``deferrable`` marks parameter errors, which ``param_errors="task"`` turns
    into a created task that FAILED instead of a 400 at submit.
    """

    def __init__(self, status: int, code: str, message: str, *, deferrable: bool = False) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.deferrable = status, code, message, deferrable


def invalid_parameter(message: str) -> SimError:
    return SimError(400, "InvalidParameter", message, deferrable=True)


def new_request_id() -> str:
    return str(uuid.uuid4())


def format_time(epoch_s: float) -> str:
    """``2024-03-01 17:38:24.817``: a task time as the service prints it (UTC+8, milliseconds)."""
    stamp = dt.datetime.fromtimestamp(epoch_s, SERVICE_TZ)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def parse_list_time(text: str) -> float:
    """A list filter time: ``YYYYMMDDhhmmss`` (UTC+8, as documented) or epoch milliseconds (as the Java SDK sends).

    Raises ValueError naming both accepted forms.
    """
    if text.isdigit() and len(text) == 14:
        return dt.datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=SERVICE_TZ).timestamp()
    if text.isdigit() and len(text) == 13:
        return int(text) / 1000.0
    raise ValueError(f"time must be YYYYMMDDhhmmss or epoch milliseconds, got {text!r}")
