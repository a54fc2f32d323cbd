"""The declarative wire schema: docs/protocol.md's tables against it, its coverage of the messages, errors' cids."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import fedwire
from fedwire import (
    ErrorCode,
    Fetch,
    HashKind,
    Hello,
    Kind,
    LogitEncoding,
    ProtocolError,
    Register,
    Update,
    decode,
    encode,
)
from fedwire import constants as wire_constants
from fedwire.fields import Array, Choice, Const, Field, Int, Logits, OptionalField, Schema, Tags, Text
from fedwire.messages import Knowledge
from fedwire.schema import ENVELOPE, LOGITS, SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
VECTORS = ROOT / "tests" / "vectors"


# ---------------------------------------------------------------- reading the docs' tables

_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_NUMBER = r"2[⁰¹²³⁴⁵⁶⁷⁸⁹]+(?:−1)?|\d{1,3}(?: \d{3})+|\d+"
_DTYPES = {"uint32": np.dtype("<u4"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}


def _number(text: str) -> int:
    """A number as the docs write it: 8192, 32 768, 2²⁸ or 2⁶³−1."""
    power = re.fullmatch(r"2([⁰¹²³⁴⁵⁶⁷⁸⁹]+)(−1)?", text)
    if power:
        return 2 ** int(power.group(1).translate(_SUPERSCRIPTS)) - (1 if power.group(2) else 0)
    return int(text.replace(" ", ""))


@dataclass(frozen=True)
class DocRow:
    """One row of a documented message table, as far as it constrains the wire."""

    key: str
    attr: str
    optional: bool
    family: str
    low: int | None = None
    high: int | None = None
    max_len: int | None = None
    max_items: int | None = None
    values: frozenset[str] | None = None
    dtype: np.dtype | None = None


def _cells(line: str) -> list[str]:
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def _doc_row(line: str) -> DocRow:
    key_cell, type_cell, _meaning = _cells(line)
    key = re.fullmatch(r"`(\w+)`(?: \(meaning: `(\w+)`\))?(, optional)?", key_cell)
    assert key, f"unreadable key cell {key_cell!r}"
    family = re.match(r"int|str|bin|map|array", type_cell)
    assert family, f"unreadable type cell {type_cell!r}"
    row: dict[str, Any] = {
        "key": key.group(1),
        "attr": key.group(2) or key.group(1),
        "optional": bool(key.group(3)),
        "family": family.group(0),
    }
    if row["family"] == "int":
        bounds = re.match(rf"int(?:, ({_NUMBER}) ≤ \w+)? ≤ ({_NUMBER})", type_cell)
        if bounds:
            row["low"] = _number(bounds.group(1)) if bounds.group(1) else 0
            row["high"] = _number(bounds.group(2))
    elif row["family"] == "str":
        if type_cell.startswith("str `"):
            row["values"] = frozenset(re.findall(r"`(\w+)`", type_cell))
        length = re.search(rf"≤ ({_NUMBER}) characters", type_cell)
        row["max_len"] = _number(length.group(1)) if length else None
    elif row["family"] == "array":
        tags = re.match(rf"array of ≤ ({_NUMBER}) str, each ≤ ({_NUMBER}) characters", type_cell)
        assert tags, f"unreadable array cell {type_cell!r}"
        row["max_items"], row["max_len"] = _number(tags.group(1)), _number(tags.group(2))
    elif row["family"] == "bin":
        dtype = re.search(r"(uint32|uint16|float32) LE", type_cell)
        row["dtype"] = _DTYPES[dtype.group(1)] if dtype else np.dtype("u1") if " bytes" in type_cell else None
    return DocRow(**row)


def _doc_tables() -> dict[str, list[DocRow]]:
    """Every table of docs/protocol.md announced by a `<!-- schema: NAME -->` line, by NAME."""
    tables: dict[str, list[DocRow]] = {}
    for match in re.finditer(r"^<!-- schema: ([\w ]+) -->\n((?:\|.*\n)+)", DOC.read_text(), re.M):
        name, lines = match.group(1), match.group(2).splitlines()
        assert name not in tables, f"two tables for {name}"
        tables[name] = [_doc_row(line) for line in lines[2:]]
    return tables


DOC_TABLES = _doc_tables()
DECLARED: dict[str, tuple[Field, ...]] = {
    "envelope": ENVELOPE,
    "logits block": LOGITS.block,
    **{kind.value: schema.fields for kind, schema in SCHEMAS.items()},
}


def _assert_documented(spec: Field, row: DocRow) -> None:
    where = f"{spec.key}: docs say {row}"
    assert (row.key, row.attr) == (spec.key, spec.attr), where
    assert row.optional == isinstance(spec, OptionalField), where
    inner = spec.inner if isinstance(spec, OptionalField) else spec
    assert row.family == inner.wire_type, where
    if isinstance(inner, Int):
        assert (row.low, row.high) == (inner.low, inner.high), where
    elif isinstance(inner, Text):
        assert row.max_len == inner.max_len, where
    elif isinstance(inner, Tags):
        assert (row.max_items, row.max_len) == (inner.max_items, inner.max_len), where
    elif isinstance(inner, Choice) and inner.enum not in (Kind, ErrorCode):  # those two have tables of their own
        assert row.values == {member.value for member in inner.enum}, where
    elif isinstance(inner, Array) and row.key != "b":  # a logits block's b takes its element type from e
        assert row.dtype == inner.dtype, where
    else:
        assert isinstance(inner, Const | Logits | Choice | Array), where


def test_every_kind_has_one_documented_table() -> None:
    assert set(DOC_TABLES) == set(DECLARED) == {"envelope", "logits block"} | {kind.value for kind in Kind}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_docs_table_matches_the_schema(name: str) -> None:
    """Same keys in the same (canonical) order, same dataclass fields, msgpack types, bounds, enums and dtypes."""
    rows, specs = DOC_TABLES[name], DECLARED[name]
    assert [row.key for row in rows] == [spec.key for spec in specs]
    for spec, row in zip(specs, rows, strict=True):
        _assert_documented(spec, row)


def test_error_codes_table_lists_every_code() -> None:
    section = DOC.read_text().split("## 9. Errors", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert codes == [code.value for code in ErrorCode]


def test_limits_table_matches_the_constants() -> None:
    section = DOC.read_text().split("## 13. Limits", 1)[1].split("\n## ", 1)[0]
    documented = {
        name: _number(value) for name, value in re.findall(rf"^\| `([A-Z_]+)` \| ({_NUMBER}) \|", section, re.M)
    }
    assert len(documented) >= 7
    for name, value in documented.items():
        assert getattr(wire_constants, name) == value, name


# ---------------------------------------------------------------- the schema itself


def test_every_kind_has_a_schema_for_its_dataclass() -> None:
    assert set(SCHEMAS) == set(Kind)
    for kind, schema in SCHEMAS.items():
        assert schema.kind is kind and schema.where == kind.value
        produced = {attr for spec in schema.fields for attr in spec.produces} - set(schema.transient)
        init = {f.name for f in dataclasses.fields(schema.message) if f.init} - {"device", "cid"}
        assert produced == init, kind


def test_a_schema_that_misses_a_field_is_refused() -> None:
    with pytest.raises(TypeError, match="do not cover"):
        Schema(Fetch, (Choice("enc", "encoding", enum=LogitEncoding),))
    with pytest.raises(TypeError, match="do not cover"):
        Schema(Fetch, (Array("ids", dtype=np.dtype("<u4")), Array("ids", dtype=np.dtype("<u4"))))


def test_wire_only_fields_stay_off_the_message() -> None:
    register = decode(encode(Register("d", 1, np.arange(2, dtype=np.uint32), np.zeros(2, np.uint16), np.ones((2, 3)))))
    assert isinstance(register, Register) and register.hashes.shape == (2, 3)
    assert not hasattr(register, "hash_bytes")


def _rejected(payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught, np.errstate(over="ignore"):
        decode(payload)
    return caught.value


UPDATE = Update("dev-1", 4, np.arange(2, dtype=np.uint32), np.ones((2, 3), np.float32), 1, LogitEncoding.FLOAT32)


def _wire(message: Any, **changes: Any) -> bytes:
    document = msgpack.unpackb(encode(message), raw=False)
    document.update(changes)
    return msgpack.packb(document, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "check"),
    [
        (_wire(UPDATE, ids=np.arange(3, dtype="<u4").tobytes()), "logit rows = ids"),
        (
            _wire(
                Knowledge("d", 1, np.arange(2, dtype=np.uint32), np.ones(2, np.uint16), np.ones((2, 3), np.float32)),
                counts=np.asarray([1, 0], "<u2").tobytes(),
            ),
            "logit rows = teachers",
        ),
        (_wire(Hello("d", 1, "m", 10, 5, HashKind.BINARY, 64), hash_dim=60), "hash_dim fits hash_kind"),
        (_wire(Hello("d", 1, "m", 10, 5, HashKind.FLOAT16, 64), hash_dim=2049), "hash_dim fits hash_kind"),
    ],
)
def test_cross_field_rules_are_named_in_the_error(payload: bytes, check: str) -> None:
    error = _rejected(payload)
    assert error.code is ErrorCode.BAD_SHAPE and check in error.detail


# ---------------------------------------------------------------- correlation ids on errors


def _valid_cid(payload: bytes) -> int | None:
    """What the server must echo: the map's `c` when it is a valid correlation id (independent of the codec)."""
    try:
        document = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    cid = document.get("c") if isinstance(document, dict) else None
    return cid if type(cid) is int and 0 <= cid < 2**63 else None


@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("invalid_*.json")))
def test_invalid_vector_errors_carry_the_valid_cid(name: str) -> None:
    payload = (VECTORS / f"{name}.bin").read_bytes()
    error = _rejected(payload)
    assert error.code is ErrorCode(json.loads((VECTORS / f"{name}.json").read_text())["error"])
    assert error.cid == _valid_cid(payload)


FETCH = Fetch("dev-1", 77, np.arange(2, dtype=np.uint32))


@pytest.mark.parametrize(
    ("payload", "cid"),
    [
        (b"\xc1", None),
        (msgpack.packb([1, 2]), None),
        (_wire(FETCH, v=2), 77),  # before v is judged, the cid is known: the server still answers request 77
        (_wire(FETCH, k="ping"), 77),
        (_wire(FETCH, d="a/b"), 77),
        (_wire(FETCH, enc="f64"), 77),
        (_wire(FETCH, c=-1), None),
        (_wire(FETCH, c=2**63), None),
        (_wire(FETCH, c=True), None),
        (_wire(FETCH, c=0, enc="f64"), 0),
        (_wire(FETCH, c=2**63 - 1, ids=b"\x00"), 2**63 - 1),
    ],
)
def test_protocol_error_cid(payload: bytes, cid: int | None) -> None:
    assert _rejected(payload).cid == cid


def test_oversized_payload_error_carries_its_cid() -> None:
    big = bytes(fedwire.MAX_PAYLOAD_BYTES)
    before = msgpack.packb({"v": 1, "k": "fetch", "pad": big, "c": 9, "d": "dev-1"}, use_bin_type=True)
    error = _rejected(before)
    assert error.code is ErrorCode.TOO_LARGE and error.cid == 9
    assert _rejected(msgpack.packb({"pad": big, "c": "9"}, use_bin_type=True)).cid is None
    assert _rejected(b"\x00" * (fedwire.MAX_PAYLOAD_BYTES + 1)).cid is None


def test_protocol_error_keeps_its_shape() -> None:
    error = ProtocolError(ErrorCode.BAD_SHAPE, "what", cid=3)
    assert isinstance(error, ValueError) and str(error) == "bad_shape: what"
    assert (error.code, error.detail, error.cid) == (ErrorCode.BAD_SHAPE, "what", 3)
    assert ProtocolError(ErrorCode.INTERNAL, "x").cid is None


# ---------------------------------------------------------------- public surface


def test_public_names_stay_where_callers_import_them() -> None:
    from fedwire.codec import (  # noqa: F401  (the names edge, broker_server and the tests import from here)
        DEVICE_ID_PATTERN,
        ProtocolError,
        as_received,
        decode,
        encode,
        encode_logits,
        model_part_bounds,
        model_parts,
    )

    assert all(hasattr(fedwire, name) for name in fedwire.__all__)
    assert fedwire.ProtocolError is ProtocolError and fedwire.model_parts is model_parts


def test_encoder_refuses_values_that_would_wrap() -> None:
    with pytest.raises(ValueError):
        encode(Fetch("d", 1, np.asarray([1, -1])))
    with pytest.raises(ValueError):
        encode(Register("d", 1, np.arange(1, dtype=np.uint32), np.zeros(1, np.uint16), np.full((1, 2), 256)))
