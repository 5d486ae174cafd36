"""Spending no more than the user said: a budget over spent plus in-flight cost.

Before an item is sent its full price is reserved (n images at the list
price, the most it can cost); when its task ends the reservation is settled
to what the service bills (only the images it generated). An item whose
reservation would take the total past the limit is not sent, and nothing
after it is: the report says what was left unsubmitted.

Reservations move only through claims (``claims.py``), which pair each with a
place among the lane's open tasks and end it once.
"""

from __future__ import annotations

__all__ = ["Budget"]


class Budget:
    def __init__(self, limit: float | None = None, *, spent: float = 0.0) -> None:
        self.limit = limit
        self.spent = spent  #: billed by tasks that ended
        self._reserved: dict[str, float] = {}  #: item_id -> the most its open task can cost
        self.exhausted = False

    @property
    def committed(self) -> float:
        return self.spent + sum(self._reserved.values())

    def reserve(self, item_id: str, amount: float, *, force: bool = False) -> bool:
        """Reserve ``amount`` for an item about to be sent; ``force`` for tasks already open on resume."""
        if item_id in self._reserved:
            return True  # already counted: its task is open
        if not force and self.limit is not None and (self.exhausted or self.committed + amount > self.limit + 1e-9):
            self.exhausted = True
            return False
        self._reserved[item_id] = amount
        return True

    def settle(self, item_id: str, actual: float) -> None:
        """The item's task ended (or was never made): what it really cost replaces its reservation."""
        if self._reserved.pop(item_id, None) is not None:
            self.spent += actual
