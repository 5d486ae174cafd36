"""The ledger: the durable record of every item, attempt, task and image of a run folder.

``interface`` says what the stages need of a ledger (:class:`RunLedger`, an async protocol: the seam where
another database plugs in) and ``opener`` opens one (:func:`open_ledger`); ``states`` holds the item and image
states and their transition table; ``records`` the rows the ledger takes and gives; ``schema`` the SQLite
file's tables and pragmas; ``sqlite`` the embedded SQLite ledger, synchronous, built in layers (``reads``,
``moves``, ``images``), and ``sqlite_async`` the same behind the protocol; ``postgres`` the ledger in a
PostgreSQL database that several processes share (layers ``pgreads``, ``pgstreams``, ``pgmoves``, ``pgimages``;
its tables and their versions in ``pgschema``, the ``wanbatch ledger`` command in ``pgcli``; psycopg is an extra,
so none of them is imported here); ``runlock`` the one-process lock of a folder; ``backend`` the service a folder
was made against.
"""

from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.opener import open_ledger
from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow, Recorded
from wanbatch.ledger.runlock import RunLock
from wanbatch.ledger.sqlite import LEDGER_FILE, SCHEMA_VERSION, Ledger, read_meta
from wanbatch.ledger.sqlite_async import SqliteLedger

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
    "SqliteLedger",
    "open_ledger",
    "read_meta",
]
