"""The wire's one exception: which protocol rule a message broke and, once its envelope is read, whose it was."""

from __future__ import annotations

from fedwire.constants import ErrorCode

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """A message that breaks the protocol.

    `code` says which rule, `detail` how; `cid` is the message's correlation id when its map carried a
    valid one (even if something else was wrong), else None, so an error reply can be matched without
    parsing the payload again.
    """

    def __init__(self, code: ErrorCode, message: str, *, cid: int | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.detail = message
        self.cid = cid
