"""Errors the engine raises, classified where they are raised (never by matching messages later)."""

from __future__ import annotations


class InvalidJobError(ValueError):
    """The job itself can never be scored as sent (permanent): retrying cannot help.

    `reason` is a short stable slug for metrics and dead-letter headers; the message is for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
