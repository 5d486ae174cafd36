"""The ledger: the durable record of every item, attempt, task and image of a run folder.

``interface`` says what the stages need of a ledger (:class:`RunLedger`, the seam where another database
plugs in); ``states`` holds the item and image states and their transition table; ``records`` the rows the
ledger takes and gives; ``schema`` the SQLite file's tables and pragmas; ``sqlite`` the embedded SQLite
ledger, built in layers (``reads``, ``moves``, ``images``); ``runlock`` the one-process lock of a folder;
``backend`` the service a folder was made against.
"""

from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow, Recorded
from wanbatch.ledger.runlock import RunLock
from wanbatch.ledger.sqlite import LEDGER_FILE, SCHEMA_VERSION, Ledger, read_meta

__all__ = [
    "LEDGER_FILE",
    "SCHEMA_VERSION",
    "AddResult",
    "ImageRecord",
    "ImageRow",
    "ItemLike",
    "ItemRow",
    "Ledger",
    "Recorded",
    "RunLedger",
    "RunLock",
    "read_meta",
]
