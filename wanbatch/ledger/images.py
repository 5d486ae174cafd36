"""The SQLite ledger's image moves: an image saved, lost or reopened, and its item settled with the last.

The third layer of :class:`wanbatch.ledger.sqlite.Ledger`. An image is recorded saved only once its file is
on disk, fsynced (the downloader's part); the move of the item that image finishes is made in the same
commit, so one saved image costs one commit.
"""

from __future__ import annotations

import sqlite3

from wanbatch.errors import IllegalTransition, LedgerError
from wanbatch.ledger.moves import ItemMoves, set_clauses
from wanbatch.ledger.records import Recorded
from wanbatch.ledger.states import IMAGE_TRANSITIONS, ImageState, ItemState, settlement

__all__ = ["ImageMoves"]


class ImageMoves(ItemMoves):
    """Image moves over the item moves; each one committed transaction."""

    def image_saved(
        self, item_id: str, index: int, *, file_name: str, sha256: str, size_bytes: int, settle: bool = False
    ) -> Recorded | None:
        """Mark one pending image saved, with its file (relative to the run folder) and checksum.

        With ``settle``, the item is settled (:meth:`settle`) in the same transaction: one commit per image
        instead of two. What settling wrote is returned, or None if the item stays as it is.
        """
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = 'saved', file_name = ?, sha256 = ?, size_bytes = ?, saved_ms = ?,"
                " error_code = NULL, error_message = NULL, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'pending'",
                (file_name, sha256, size_bytes, now, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, ImageState.saved)
            return self._settle(conn, item_id, now) if settle else None

    def image_final(
        self, item_id: str, index: int, state: ImageState, *, code: str = "", message: str = "", settle: bool = False
    ) -> Recorded | None:
        """Mark one pending image failed or expired, with the reason; ``settle`` as for :meth:`image_saved`."""
        state = ImageState(state)
        if state not in IMAGE_TRANSITIONS[ImageState.pending] - {ImageState.saved}:
            raise LedgerError(f"image_final() takes failed or expired, not {state}; a saved image needs image_saved()")
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = ?, error_code = ?, error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'pending'",
                (state, code or None, message or None, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, state)
            return self._settle(conn, item_id, now) if settle else None

    def reopen_image(self, item_id: str, index: int, *, reason: str) -> None:
        """A saved image whose file is gone or damaged (found on resume): pending again, to be fetched while its
        URL lives, its item back to generated, in one transaction."""
        now = self._clock.now_ms()
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET state = 'pending', file_name = NULL, sha256 = NULL, size_bytes = NULL,"
                " saved_ms = NULL, error_code = 'FileMissing', error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ? AND state = 'saved'",
                (reason, now, item_id, index),
            )
            if done.rowcount == 0:
                self._refuse_image_move(conn, item_id, index, ImageState.pending)
            self._move(conn, item_id, ItemState.saved, ItemState.generated, note=reason, now=now, refuse=False)

    def update_image(self, item_id: str, index: int, *, error_code: str | None, error_message: str | None) -> None:
        """Note why a pending image is not saved yet (a download that failed for now); its state stays."""
        with self._tx() as conn:
            done = conn.execute(
                "UPDATE images SET error_code = ?, error_message = ?, updated_ms = ?"
                " WHERE item_id = ? AND image_index = ?",
                (error_code, error_message, self._clock.now_ms(), item_id, index),
            )
            if done.rowcount == 0:
                raise LedgerError(f"no image {index} of item {item_id} in {self.path}")

    def settle(self, item_id: str) -> Recorded | None:
        """Finish a generated item whose images are all final, in one transaction; returns its new row and its
        images (for the thumbnails), or None when it stays as it is.

        saved when every image the service produced is saved; expired when any of them died first. Call it
        after each image's end, and on start for generated items (a stop may fall between the two).
        """
        now = self._clock.now_ms()
        with self._tx() as conn:
            return self._settle(conn, item_id, now)

    def _settle(self, conn: sqlite3.Connection, item_id: str, now: int) -> Recorded | None:
        """:meth:`settle` inside the caller's transaction; images first, as most calls end at a pending one.
        An item that is not generated (settled already) is left as it is by the move's compare-and-set."""
        images = self._images_of(conn, item_id)
        settled = settlement(image.state for image in images)
        if settled is None:
            return None
        target, note = settled
        # An item that lost images says why, like every other item that did not end saved.
        reason = {"error_code": "UrlExpired", "error_message": note} if target is ItemState.expired else {}
        extra, params = set_clauses(reason)
        moved = self._move(
            conn, item_id, ItemState.generated, target, note=note, now=now, extra=extra, params=params, refuse=False
        )
        return None if moved is None else Recorded(row=moved, images=tuple(images))

    def _refuse_image_move(self, conn: sqlite3.Connection, item_id: str, index: int, target: ImageState) -> None:
        row = conn.execute(
            "SELECT state FROM images WHERE item_id = ? AND image_index = ?", (item_id, index)
        ).fetchone()
        if row is None:
            raise LedgerError(f"no image {index} of item {item_id} in {self.path}")
        raise IllegalTransition(f"image {index} of item {item_id}: illegal move {row[0]} → {target}")
