"""FedAvg model chunking: which floats of a flat model vector each wire part carries."""

from __future__ import annotations

from fedwire.constants import MODEL_CHUNK_FLOATS

__all__ = ["model_part_bounds", "model_parts"]


def model_part_bounds(size: int, part: int) -> tuple[int, int]:
    """[start, stop) of the floats that part `part` of a `size`-float model carries."""
    start = part * MODEL_CHUNK_FLOATS
    return start, min(start + MODEL_CHUNK_FLOATS, size)


def model_parts(size: int) -> int:
    """How many parts a model of `size` floats travels in (at least one)."""
    return max(1, -(-size // MODEL_CHUNK_FLOATS))
