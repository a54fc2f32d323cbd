"""The kinds of wire field a schema declares: each validates, decodes and encodes its value; one walker runs them."""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import numpy as np

from fedwire.arrays import (
    BLOCK_SCALED_ENCODINGS,
    F32,
    LOGIT_DTYPES,
    SCALED_ENCODINGS,
    dequantise_logits,
    pack_finite,
    pack_unsigned,
    quantise_logits,
)
from fedwire.constants import MAX_CLASSES, MAX_IDS_PER_MESSAGE, ErrorCode, Kind, LogitEncoding
from fedwire.errors import ProtocolError
from fedwire.messages import Message

__all__ = ["Array", "Check", "Choice", "Const", "Field", "Int", "Logits", "OptionalField", "Schema", "Tags", "Text"]

# Decoded values of one message so far, by attribute name; shape rules and checks read them.
Values = dict[str, Any]
ShapeRule = Callable[[Mapping[str, Any]], tuple[int, ...]]


def _missing(where: str, key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_SCHEMA, f"{where} lacks field '{key}'")


def _mistyped(where: str, key: str, wanted: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}.{key} must be {wanted}, got {type(value).__name__}")


# The Python type msgpack decodes each wire type to (booleans are not integers: `type(x) is int` is exact).
_DECODED_AS: dict[str, type] = {"int": int, "str": str, "bin": bytes, "array": list, "map": dict}


class Field(ABC):
    """One entry of a msgpack map: its wire `key`, the attribute it decodes to, and its msgpack type."""

    key: str
    attr: str
    wire_type: str  # "int", "str", "bin", "map" or "array": the msgpack family the docs' tables name

    @property
    def produces(self) -> tuple[str, ...]:
        """The decoded attributes this field fills."""
        return (self.attr,)

    @abstractmethod
    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        """Validate raw[key] and store what it means in out; raise ProtocolError otherwise."""

    def _take(self, raw: Mapping[str, Any], *, where: str, typed: bool = True) -> Any:
        """raw[key], which must be present and (when `typed`) of this field's msgpack type: else bad_schema."""
        try:
            value = raw[self.key]
        except KeyError:
            raise _missing(where, self.key) from None
        if typed and type(value) is not _DECODED_AS[self.wire_type]:
            raise _mistyped(where, self.key, self.wire_type, value)
        return value

    @abstractmethod
    def emit(self, source: Any, body: dict[str, Any]) -> None:
        """Write this field's wire value for the message `source` into the map `body`."""


class Const(Field):
    """A fixed value (the protocol version): missing, mistyped or different are all `code`."""

    wire_type = "int"

    def __init__(self, key: str, value: int, *, code: ErrorCode) -> None:
        self.key, self.attr, self.value, self.code = key, key, value, code

    @property
    def produces(self) -> tuple[str, ...]:
        return ()

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        value = raw.get(self.key)
        if type(value) is not int or value != self.value:
            raise ProtocolError(self.code, f"{where}.{self.key}={value!r}, this side speaks {self.value}")

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = self.value


class Int(Field):
    """A non-negative msgpack integer in [low, high] (booleans are not integers); out of range is `code`.

    `derive` makes a wire-only field whose value is computed from the message when encoding.
    """

    wire_type = "int"

    def __init__(
        self,
        key: str,
        attr: str | None = None,
        *,
        high: int,
        low: int = 0,
        code: ErrorCode = ErrorCode.BAD_SHAPE,
        derive: Callable[[Any], int] | None = None,
    ) -> None:
        self.key, self.attr = key, attr or key
        self.low, self.high, self.code, self.derive = low, high, code, derive

    def accepts(self, value: Any) -> bool:
        """Whether `value` as decoded by msgpack is a valid value of this field."""
        return type(value) is int and self.low <= value <= self.high

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        value = self._take(raw, where=where)
        if not self.low <= value <= self.high:
            raise ProtocolError(self.code, f"{where}.{self.key}={value} outside [{self.low}, {self.high}]")
        out[self.attr] = value

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = self.derive(source) if self.derive else getattr(source, self.attr)


class Text(Field):
    """A msgpack str of at most `max_len` code points (longer: too_large) and, if given, matching `pattern`."""

    wire_type = "str"

    def __init__(
        self, key: str, attr: str | None = None, *, max_len: int | None = None, pattern: re.Pattern[str] | None = None
    ) -> None:
        self.key, self.attr, self.max_len, self.pattern = key, attr or key, max_len, pattern

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        value = self._take(raw, where=where)
        if self.max_len is not None and len(value) > self.max_len:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{where}.{self.key} is longer than {self.max_len}")
        if self.pattern is not None and not self.pattern.match(value):
            raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}.{self.key}={value!r} must match {self.pattern.pattern}")
        out[self.attr] = value

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = getattr(source, self.attr)


class Choice(Field):
    """A msgpack str naming one member of `enum`; anything else is bad_schema."""

    wire_type = "str"

    def __init__(self, key: str, attr: str | None = None, *, enum: type[StrEnum]) -> None:
        self.key, self.attr, self.enum = key, attr or key, enum
        self._members: dict[str, StrEnum] = {member.value: member for member in enum}

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        value = self._take(raw, where=where)
        member = self._members.get(value)
        if member is None:
            allowed = ", ".join(self._members)
            raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where}.{self.key}='{value}' is not one of {allowed}")
        out[self.attr] = member

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = getattr(source, self.attr).value


class Tags(Field):
    """A msgpack array of at most `max_items` str of at most `max_len` code points each, decoded to a tuple."""

    wire_type = "array"

    def __init__(self, key: str, attr: str | None = None, *, max_items: int, max_len: int) -> None:
        self.key, self.attr, self.max_items, self.max_len = key, attr or key, max_items, max_len

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        value = self._take(raw, where=where)
        if len(value) > self.max_items or not all(type(tag) is str and len(tag) <= self.max_len for tag in value):
            raise ProtocolError(
                ErrorCode.BAD_SCHEMA, f"{where}.{self.key} must be at most {self.max_items} str of {self.max_len}"
            )
        out[self.attr] = tuple(value)

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = list(getattr(source, self.attr))


class Array(Field):
    """A msgpack bin holding raw little-endian elements of `dtype`.

    `shape` is the rule giving the array's shape from the fields decoded before it (a wrong byte length is
    bad_shape); without one the length is free: a partial element is bad_dtype, more than `max_count`
    elements too_large. `distinct` (a repeated element is bad_shape) and `finite` (NaN/inf: non_finite)
    add value rules; `decoded` converts the received view to a writable array of that dtype.
    """

    wire_type = "bin"

    def __init__(
        self,
        key: str,
        attr: str | None = None,
        *,
        dtype: np.dtype,
        shape: ShapeRule | None = None,
        max_count: int | None = None,
        distinct: bool = False,
        finite: bool = False,
        decoded: type[np.generic] | None = None,
    ) -> None:
        self.key, self.attr, self.dtype = key, attr or key, dtype
        self.shape, self.max_count, self.distinct = shape, max_count, distinct
        self.finite, self.decoded = finite, decoded

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        out[self.attr] = self.array(raw, out, where=where)

    def array(self, raw: Mapping[str, Any], out: Mapping[str, Any], *, where: str) -> np.ndarray:
        """The validated array raw[key] holds."""
        data = self._take(raw, where=where)
        itemsize = self.dtype.itemsize
        if self.shape is None:
            if len(data) % itemsize:
                raise ProtocolError(ErrorCode.BAD_DTYPE, f"{where}.{self.key} is not a whole number of {self.dtype}")
            count = len(data) // itemsize
            if self.max_count is not None and count > self.max_count:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"{where}.{self.key} has {count} elements, limit {self.max_count}"
                )
            array = np.frombuffer(data, dtype=self.dtype)
        else:
            dims = self.shape(out)
            count = math.prod(dims)
            if len(data) != count * itemsize:
                raise ProtocolError(
                    ErrorCode.BAD_SHAPE, f"{where}.{self.key} has {len(data)} bytes, expected {dims} x {itemsize}"
                )
            array = np.frombuffer(data, dtype=self.dtype)
            if len(dims) > 1:
                array = array.reshape(dims)
        if self.distinct and count > 1:
            ordered = np.sort(array, axis=None)
            if (ordered[1:] == ordered[:-1]).any():
                raise ProtocolError(ErrorCode.BAD_SHAPE, f"{where}.{self.key} repeats a value")
        if self.finite and not np.isfinite(array).all():
            raise ProtocolError(ErrorCode.NON_FINITE, f"{where}.{self.key} holds NaN or infinite values")
        return array if self.decoded is None else array.astype(self.decoded)

    def pack(self, values: np.ndarray) -> bytes:
        """The wire bytes of `values` (ValueError where they do not fit the dtype)."""
        if self.dtype.kind == "f":
            return pack_finite(values)
        return pack_unsigned(values, self.dtype)

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = self.pack(getattr(source, self.attr))


def _block_matrix(block: Mapping[str, Any]) -> tuple[int, ...]:
    """n x m elements, row-major."""
    return block["n"], block["m"]


def _block_rows(block: Mapping[str, Any]) -> tuple[int, ...]:
    """One per row."""
    return (block["n"],)


def _block_one(block: Mapping[str, Any]) -> tuple[int, ...]:
    """One for the whole block."""
    return (1,)


class Logits(Field):
    """A nested logits block (docs/protocol.md §6): decodes to a float32 (n, m) matrix and its encoding.

    `e` picks the element type of `b`; only the encodings in SCALED_ENCODINGS carry `s`, one float32 scale
    per row, and those in BLOCK_SCALED_ENCODINGS, one for the block (ignored otherwise). Every decoded value
    must be finite (non_finite).
    """

    wire_type = "map"

    def __init__(self, key: str, attr: str | None = None, *, encoding_attr: str = "encoding") -> None:
        self.key, self.attr, self.encoding_attr = key, attr or key, encoding_attr
        self.encoding = Choice("e", "encoding", enum=LogitEncoding)
        self.rows = Int("n", high=MAX_IDS_PER_MESSAGE)
        self.cols = Int("m", high=MAX_CLASSES)
        self.data = {enc: Array("b", dtype=dtype, shape=_block_matrix) for enc, dtype in LOGIT_DTYPES.items()}
        self.scales = Array("s", dtype=F32, shape=_block_rows, finite=True)
        # The `s` each scaled encoding carries: a scale per row, or one for the block.
        block_scale = Array("s", dtype=F32, shape=_block_one, finite=True)
        self._scales_of = {e: self.scales for e in SCALED_ENCODINGS} | {e: block_scale for e in BLOCK_SCALED_ENCODINGS}

    @property
    def produces(self) -> tuple[str, ...]:
        return (self.attr, self.encoding_attr)

    @property
    def block(self) -> tuple[Field, ...]:
        """The block's own entries in canonical order, `s` last (present for scaled encodings only)."""
        return (self.encoding, self.rows, self.cols, self.data[LogitEncoding.FLOAT32], self.scales)

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        block = self._take(raw, where=where, typed=False)  # read() says what a block must be
        out[self.attr], out[self.encoding_attr] = self.read(block, f"{where}.{self.key}")

    def read(self, block: Any, where: str) -> tuple[np.ndarray, LogitEncoding]:
        """The matrix and encoding a logits block (a decoded msgpack map) carries."""
        if type(block) is not dict:
            raise ProtocolError(ErrorCode.BAD_SCHEMA, f"{where} must be a map")
        parts: Values = {}
        self.encoding.unpack(block, parts, where=where)
        self.rows.unpack(block, parts, where=where)
        self.cols.unpack(block, parts, where=where)
        encoding: LogitEncoding = parts["encoding"]
        data = self.data[encoding].array(block, parts, where=where)
        scale_field = self._scales_of.get(encoding)
        scales = None if scale_field is None else scale_field.array(block, parts, where=where)
        matrix = dequantise_logits(data, scales)
        if not np.isfinite(matrix).all():
            raise ProtocolError(ErrorCode.NON_FINITE, f"{where} holds NaN or infinite values")
        return matrix, encoding

    def pack(self, logits: np.ndarray, encoding: LogitEncoding) -> dict[str, Any]:
        """The logits block of `logits` sent with `encoding` (ValueError for non-2-D or non-finite logits)."""
        quantised = quantise_logits(logits, encoding)
        block: dict[str, Any] = {
            self.encoding.key: encoding.value,
            self.rows.key: quantised.rows,
            self.cols.key: quantised.cols,
            self.data[encoding].key: quantised.data,
        }
        if quantised.scales is not None:
            block[self.scales.key] = quantised.scales
        return block

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        body[self.key] = self.pack(getattr(source, self.attr), getattr(source, self.encoding_attr))


class OptionalField(Field):
    """A field that may be absent: absent decodes to `default`, and the default is not sent."""

    def __init__(self, inner: Field, *, default: Any) -> None:
        self.inner, self.default = inner, default
        self.key, self.attr, self.wire_type = inner.key, inner.attr, inner.wire_type

    def unpack(self, raw: Mapping[str, Any], out: Values, *, where: str) -> None:
        if self.key in raw:
            self.inner.unpack(raw, out, where=where)
        else:
            out[self.attr] = self.default

    def emit(self, source: Any, body: dict[str, Any]) -> None:
        if getattr(source, self.attr) != self.default:
            self.inner.emit(source, body)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
    """A named rule between fields of one message: `violation` returns what is wrong (or None), raised as `code`."""

    name: str
    code: ErrorCode
    violation: Callable[[Mapping[str, Any]], str | None]

    def enforce(self, values: Mapping[str, Any], where: str) -> None:
        """Raise ProtocolError if the decoded `values` break this rule."""
        problem = self.violation(values)
        if problem is not None:
            raise ProtocolError(self.code, f"{where}: {problem} ({self.name})")


class Schema:
    """How one message type travels: its fields in canonical wire order, then the checks across them.

    Decoding runs every field in order (a field's shape rule may read those before it), then every check,
    and builds the message from the attributes; attributes that are no dataclass field (such as
    `hash_bytes`) are wire-only. Construction fails unless the fields fill every dataclass field but the
    envelope's.
    """

    def __init__(self, message: type, fields: tuple[Field, ...], *, checks: tuple[Check, ...] = ()) -> None:
        members = {f.name: f for f in dataclasses.fields(message)}
        self.message, self.fields, self.checks = message, fields, checks
        kind = members["kind"].default
        if not isinstance(kind, Kind):
            raise TypeError(f"{message.__name__} has no message kind")
        self.kind: Kind = kind
        self.where = kind.value
        produced = [attr for spec in fields for attr in spec.produces]
        wanted = {name for name, member in members.items() if member.init} - {"device", "cid"}
        if len(set(produced)) != len(produced) or not wanted <= set(produced):
            raise TypeError(f"{message.__name__}: fields {produced} do not cover {sorted(wanted)} exactly once")
        self.transient = tuple(attr for attr in produced if attr not in wanted)

    def build(self, raw: Mapping[str, Any], values: Values) -> Message:
        """Decode and check this kind's fields of `raw` into `values` (which holds the envelope's), then the message."""
        where = self.where
        for spec in self.fields:
            spec.unpack(raw, values, where=where)
        for check in self.checks:
            check.enforce(values, where)
        for attr in self.transient:
            del values[attr]
        message: Message = self.message(**values)
        return message

    def emit(self, message: Any, body: dict[str, Any]) -> None:
        """Write this kind's fields of `message` into the map `body`, in canonical order."""
        for spec in self.fields:
            spec.emit(message, body)
