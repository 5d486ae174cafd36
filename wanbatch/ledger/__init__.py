"""The ledger: the durable record of every item, attempt, task and image of a run folder.

``states`` holds the item and image states and their transition table; ``records`` the rows the
ledger takes and gives; ``sqlite`` the embedded SQLite ledger; ``runlock`` the one-process lock of a
folder; ``backend`` and ``runfolder`` what a folder was made against and from.
"""

from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow
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
    "RunLock",
    "read_meta",
]
