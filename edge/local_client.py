"""The local baseline on a device: cross-entropy on its own shard only, no server and no knowledge exchanged."""

from __future__ import annotations

from edge.baseline import NoKnowledge


class LocalClient(NoKnowledge):
    """Every hook does nothing: no hello, no teacher (CE only), nothing sent, nothing of its own to checkpoint."""


__all__ = ["LocalClient"]
