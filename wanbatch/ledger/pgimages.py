"""The PostgreSQL ledger's image moves: an image saved, lost or reopened, and its item settled with the last.

The fourth layer of :class:`wanbatch.ledger.postgres.PgLedger`. An image move alone is one statement; with
``settle`` it is one transaction sent as a pipeline: the item's lock, the image's update and the read of the
item's images go together, then the item's move if the images call for one, then the commit. The item is locked
first because two images of one item are saved side by side on two connections: without the lock each reads the
other still pending and neither settles the item; with it the second reads the first's image as committed.
Every transaction that touches an item and its images locks the item's row before the images' rows.
"""

from __future__ import annotations

import psycopg

from wanbatch.errors import IllegalTransition, LedgerError
from wanbatch.ledger.pgmoves import _IMAGES_OF, _NOT_TAKEN_OVER, OPEN_LIST, PgMoves, set_fields
from wanbatch.ledger.pgreads import image_row
from wanbatch.ledger.records import Recorded
from wanbatch.ledger.states import IMAGE_TRANSITIONS, ImageState, ItemState, settlement

__all__ = ["PgImageMoves"]

_LOCK_ITEM = "SELECT 1 FROM items WHERE batch_id = %(batch)s AND item_id = %(id)s FOR UPDATE"
_WHERE_IMAGE = "WHERE batch_id = %(batch)s AND item_id = %(id)s AND image_index = %(index)s"
# A worker moves no image of an open item another worker holds (see pgmoves._FENCE); a reader is not fenced. A
# worker taken over reopens no saved image either: its item would be generated again as that worker's, and no
# worker's to save.
_FENCED = (
    f"{_WHERE_IMAGE} AND (%(me)s::text IS NULL OR NOT EXISTS (SELECT 1 FROM items WHERE batch_id = %(batch)s"
    " AND item_id = %(id)s AND state = ANY(%(open)s) AND owner IS DISTINCT FROM %(me)s))"
)
_SAVED = (
    "UPDATE images SET state = 'saved', file_name = %(file_name)s, sha256 = %(sha256)s, size_bytes = %(size)s,"
    f" saved_ms = %(now)s, error_code = NULL, error_message = NULL, updated_ms = %(now)s {_FENCED}"
    " AND state = 'pending' RETURNING image_index"
)
_FINAL = (
    "UPDATE images SET state = %(state)s, error_code = %(code)s, error_message = %(message)s, updated_ms = %(now)s"
    f" {_FENCED} AND state = 'pending' RETURNING image_index"
)
_REOPEN = (
    "UPDATE images SET state = 'pending', file_name = NULL, sha256 = NULL, size_bytes = NULL, saved_ms = NULL,"
    f" error_code = 'FileMissing', error_message = %(reason)s, updated_ms = %(now)s {_FENCED}"
    f" AND state = 'saved' AND {_NOT_TAKEN_OVER} RETURNING image_index"
)


class _Refused(Exception):
    """The image was not in the state its move starts from: roll back, then say why."""


class PgImageMoves(PgMoves):
    """Image moves over the item moves; each one committed transaction."""

    async def image_saved(
        self, item_id: str, index: int, *, file_name: str, sha256: str, size_bytes: int, settle: bool = False
    ) -> Recorded | None:
        """Mark one pending image saved, with its file and checksum; with ``settle``, settle its item in the same
        transaction and return what that wrote (None if the item stays as it is)."""
        params = {"file_name": file_name, "sha256": sha256, "size": size_bytes}
        return await self._image_move(_SAVED, item_id, index, ImageState.saved, params, settle=settle)

    async def image_final(
        self, item_id: str, index: int, state: ImageState, *, code: str = "", message: str = "", settle: bool = False
    ) -> Recorded | None:
        """Mark one pending image failed or expired, with the reason; ``settle`` as for :meth:`image_saved`."""
        state = ImageState(state)
        if state not in IMAGE_TRANSITIONS[ImageState.pending] - {ImageState.saved}:
            raise LedgerError(f"image_final() takes failed or expired, not {state}; a saved image needs image_saved()")
        params = {"state": str(state), "code": code or None, "message": message or None}
        return await self._image_move(_FINAL, item_id, index, state, params, settle=settle)

    async def reopen_image(self, item_id: str, index: int, *, reason: str) -> None:
        """A saved image whose file is gone or damaged: pending again and its item back to generated, in one
        transaction (one pipeline)."""
        key = {"batch": self._batch, "me": self.worker, "open": OPEN_LIST, "id": item_id, "index": index}
        key["now"] = self._clock.now_ms()
        key["reason"] = reason
        try:
            async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                await conn.execute(_LOCK_ITEM, key)
                reopened = await conn.execute(_REOPEN, key)
                await self._move_in(conn, item_id, ItemState.saved, ItemState.generated, note=reason)
                if await reopened.fetchone() is None:
                    raise _Refused
        except _Refused:
            await self._refuse_image_move(item_id, index, ImageState.pending)

    async def update_image(
        self, item_id: str, index: int, *, error_code: str | None, error_message: str | None
    ) -> None:
        """Note why a pending image is not saved yet; its state stays."""
        row = await self._one(
            f"UPDATE images SET error_code = %(code)s, error_message = %(message)s, updated_ms = %(now)s {_FENCED}"
            " RETURNING image_index",
            {"id": item_id, "index": index, "code": error_code, "message": error_message, "now": self._clock.now_ms()}
            | {"open": OPEN_LIST},
        )
        if row is None:
            raise LedgerError(f"no image {index} of item {item_id} in {self.path}")

    async def settle(self, item_id: str) -> Recorded | None:
        """Finish a generated item whose images are all final (saved, or expired when any died first), in one
        transaction; returns its new row and images, or None when it stays as it is."""
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            await conn.execute(_LOCK_ITEM, {"batch": self._batch, "id": item_id})
            return await self._settle(conn, item_id)

    async def _image_move(
        self, sql: str, item_id: str, index: int, target: ImageState, params: dict, *, settle: bool
    ) -> Recorded | None:
        key = {"batch": self._batch, "me": self.worker, "open": OPEN_LIST, "id": item_id, "index": index}
        key["now"] = self._clock.now_ms()
        key |= params
        try:
            if not settle:
                if await self._one(sql, key) is None:
                    raise _Refused
                return None
            async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                await conn.execute(_LOCK_ITEM, key)
                moved = await conn.execute(sql, key)
                images = await conn.execute(_IMAGES_OF, key)
                if await moved.fetchone() is None:
                    raise _Refused
                return await self._settle(conn, item_id, [image_row(row) for row in await images.fetchall()])
        except _Refused:
            await self._refuse_image_move(item_id, index, target)
        return None

    async def _settle(self, conn: psycopg.AsyncConnection, item_id: str, images: list | None = None) -> Recorded | None:
        """:meth:`settle` inside the caller's transaction, given the item's images if they were read already. An
        item that is not generated (settled already) is left as it is by the move's compare-and-set."""
        if images is None:
            cur = await conn.execute(_IMAGES_OF, {"batch": self._batch, "id": item_id})
            images = [image_row(row) for row in await cur.fetchall()]
        settled = settlement(image.state for image in images)
        if settled is None:
            return None
        target, note = settled
        reason = {"error_code": "UrlExpired", "error_message": note} if target is ItemState.expired else {}
        fields, params = set_fields(reason)
        moved = await self._move_in(conn, item_id, ItemState.generated, target, note=note, fields=fields, params=params)
        return None if moved is None else Recorded(row=moved, images=tuple(images))

    async def _refuse_image_move(self, item_id: str, index: int, target: ImageState) -> None:
        await self._check_owner(item_id)
        row = await self._one(f"SELECT state FROM images {_WHERE_IMAGE}", {"id": item_id, "index": index})
        if row is None:
            raise LedgerError(f"no image {index} of item {item_id} in {self.path}")
        raise IllegalTransition(f"image {index} of item {item_id}: illegal move {row[0]} → {target}")
