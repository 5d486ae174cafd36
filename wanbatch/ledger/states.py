"""The states of an item and of its images, and the moves between them, as data.

An item is one generation request (one task on the service). Read the table
top to bottom to follow an item's life::

    planned ─▶ submitting ─▶ queued ─▶ generated ◀─▶ saved   (back: a saved file found missing on resume)
                   │            │           └─▶ expired
                   │            ├─▶ failed ─┐
                   ├─▶ rejected ┼───────────┴─▶ planned   (explicit retry only)
                   ├─▶ unknown ─┼─▶ queued | planned | expired
                   └─▶ planned  └─▶ canceled | expired
                                      canceled ─▶ planned     (the next run)

An image goes ``pending → saved | failed | expired``, and ``saved → pending``
when its file is found missing or damaged on resume: it is fetched again
while its URL lives (and its item goes back to ``generated`` with it).

The money rule lives in the ``submitting`` row: an item goes back to
``planned`` only when the attempt is *known* to have created no task; when it
may have, it goes to ``unknown`` and is reconciled, never re-sent blindly.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable

from wanbatch.errors import IllegalTransition

__all__ = [
    "FINAL_STATES",
    "IMAGE_TRANSITIONS",
    "OPEN_STATES",
    "TRANSITIONS",
    "ImageState",
    "ItemState",
    "check_transition",
    "settlement",
]


class ItemState(enum.StrEnum):
    """Where an item is in its life. Stored in the ledger by value."""

    #: In the ledger, never sent (or known not to have created a task).
    planned = "planned"
    #: Committed just before the POST: a crash here means the outcome is unknown.
    submitting = "submitting"
    #: The service gave a task id; the task is pending or running there.
    queued = "queued"
    #: The task SUCCEEDED with at least one image; images are being downloaded.
    generated = "generated"
    #: Every image the service produced is on disk, verified.
    saved = "saved"
    #: The service refused the request for good (moderation, invalid parameter); nothing billed.
    rejected = "rejected"
    #: The task FAILED, or SUCCEEDED with every image failed; nothing billed.
    failed = "failed"
    #: The POST may have created a task (timeout or crash after sending): reconcile before anything else.
    unknown = "unknown"
    #: Too late: the task id or an image URL died before we got what it held.
    expired = "expired"
    #: Stopped on purpose before it produced anything (nothing billed); the next run of the manifest makes it.
    canceled = "canceled"


class ImageState(enum.StrEnum):
    """One image of a task. A task with ``n`` > 1 can return some good and some failed."""

    #: The service produced it and gave a URL; not yet on disk.
    pending = "pending"
    #: On disk, verified, with its sha256.
    saved = "saved"
    #: The service reported this image failed (it is not billed).
    failed = "failed"
    #: Its URL died before it was saved: paid for and lost.
    expired = "expired"


S = ItemState
TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    S.planned: frozenset({S.submitting, S.canceled}),
    S.submitting: frozenset({S.queued, S.rejected, S.unknown, S.planned}),
    S.unknown: frozenset({S.queued, S.planned, S.expired}),
    S.queued: frozenset({S.generated, S.failed, S.canceled, S.expired}),
    S.generated: frozenset({S.saved, S.expired}),
    S.failed: frozenset({S.planned}),
    S.rejected: frozenset({S.planned}),
    S.saved: frozenset({S.generated}),  # a saved file found missing on resume: fetched again
    S.expired: frozenset(),
    S.canceled: frozenset({S.planned}),
}
del S

IMAGE_TRANSITIONS: dict[ImageState, frozenset[ImageState]] = {
    ImageState.pending: frozenset({ImageState.saved, ImageState.failed, ImageState.expired}),
    ImageState.saved: frozenset({ImageState.pending}),  # a saved file found missing on resume
    ImageState.failed: frozenset(),
    ImageState.expired: frozenset(),
}

#: The states of an item whose task is (or may be) open, or whose images wait to be saved: the items a resume
#: (or, in a fleet, a takeover) hands to the stages, held by one worker at a time.
OPEN_STATES = frozenset({ItemState.submitting, ItemState.unknown, ItemState.queued, ItemState.generated})

#: Where an item's life ends: no move leads out of these, but for a saved item whose file went missing.
FINAL_STATES = frozenset({ItemState.saved, ItemState.expired})


def settlement(images: Iterable[ImageState]) -> tuple[ItemState, str] | None:
    """Where a generated item goes once its images (their states) are all final, and the note that says why:
    expired when any died before it was saved, else saved; None while one is pending (or it has none)."""
    per_state = Counter(images)
    if per_state.get(ImageState.pending):
        return None
    if per_state.get(ImageState.expired):
        return ItemState.expired, f"{per_state[ImageState.expired]} image(s) expired before saving"
    if per_state.get(ImageState.saved):
        return ItemState.saved, f"{per_state[ImageState.saved]} image(s) saved"
    return None


def check_transition(item_id: str, source: ItemState, target: ItemState) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``source → target``."""
    if target not in TRANSITIONS[source]:
        allowed = ", ".join(sorted(TRANSITIONS[source])) or "nothing: it is final"
        raise IllegalTransition(
            f"item {item_id}: illegal move {source} → {target}; from {source} it may go to {allowed}"
        )
