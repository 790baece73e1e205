"""A minimal, dependency-free reader for R's XDR serialization format.

This is the project's own reader (no R, rpy2 or pyreadr), written to load the Jane Austen novels that
Debian's ``r-cran-janeaustenr`` package ships as an R *lazy-load database*:

* ``Rdata.rdx`` is a compressed serialization (gzip or zlib in practice; bzip2/xz also accepted) of a
  named list with ``variables`` (object name -> integer vector ``[offset, length]`` into ``Rdata.rdb``),
  ``references`` and ``compressed``.
* each entry of ``Rdata.rdb`` at such an offset is a 4-byte big-endian uncompressed length followed by
  a zlib stream (``compressed`` TRUE/1), or, for ``compressed`` 2/3, a one-byte type tag (``'Z'`` xz,
  ``'2'`` bzip2, ``'0'`` stored) and the stream.  It decompresses to a serialization of the object.

Supported: XDR (``"X\\n"``) serializations, versions 2 and 3 (v3 carries a native-encoding string in
the header); the SEXP types NILVALUE_SXP, SYMSXP, LISTSXP (pairlists, with attributes and tags),
CHARSXP (including ``NA_character_``, stored with length -1), LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP,
EXPRSXP and REFSXP back-references, plus the ATTRIB/TAG/OBJECT flag bits and long vector lengths.
Anything else (closures, environments, ALTREP, ASCII or native-binary formats, ...) raises
:class:`RDataError`, a :class:`CorpusError`.

Results are plain Python values wrapped in :class:`RObject` (``sexptype``, ``value``, ``attributes``):
vectors hold a ``list`` (``None`` for NA in character/integer/logical vectors), CHARSXP and SYMSXP hold
a ``str`` (``None`` for ``NA_character_``), pairlists hold a list of ``(tag, value)`` tuples.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CorpusError(ValueError):
    """A corpus could not be located, fetched, parsed or split. Messages are one clear line."""


class RDataError(CorpusError):
    """An R serialization is malformed or uses a feature this minimal reader does not support."""


# SEXP type codes (R's Rinternals.h) and serialization pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 9, 10, 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP = 255, 254
_VECTOR_TYPES = {LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP}
_TYPE_NAMES = {
    0: "NILSXP",
    1: "SYMSXP",
    2: "LISTSXP",
    3: "CLOSXP",
    4: "ENVSXP",
    5: "PROMSXP",
    6: "LANGSXP",
    9: "CHARSXP",
    10: "LGLSXP",
    13: "INTSXP",
    14: "REALSXP",
    15: "CPLXSXP",
    16: "STRSXP",
    19: "VECSXP",
    20: "EXPRSXP",
    24: "RAWSXP",
    25: "S4SXP",
    238: "ALTREP_SXP",
    239: "ATTRLISTSXP",
    240: "ATTRLANGSXP",
    241: "BASEENV_SXP",
    242: "EMPTYENV_SXP",
    247: "PERSISTSXP",
    248: "PACKAGESXP",
    249: "NAMESPACESXP",
    250: "BASENAMESPACE_SXP",
    251: "MISSINGARG_SXP",
    252: "UNBOUNDVALUE_SXP",
    253: "GLOBALENV_SXP",
}
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_NA_INTEGER = -(2**31)
# CHARSXP encoding bits live in the "levels" field (flags >> 12).
_LATIN1, _BYTES = 1 << 2, 1 << 1


@dataclass
class RObject:
    """One deserialized R object: its SEXP type code, Python value and attributes (by name)."""

    sexptype: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.sexptype, str(self.sexptype))

    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a list of strings, or None if absent."""
        names = self.attributes.get("names")
        return None if names is None else list(names.value)

    def as_dict(self) -> dict[str, Any]:
        """A named list/vector as ``{name: element}`` (elements stay RObjects or plain values)."""
        names = self.names()
        if names is None or not isinstance(self.value, list) or len(names) != len(self.value):
            raise RDataError(f"R object of type {self.type_name} is not a fully named vector")
        return {str(n): v for n, v in zip(names, self.value, strict=True)}


class _Reader:
    """Cursor over the bytes of one XDR serialization, with the REFSXP reference table."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[RObject] = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(f"truncated R serialization (wanted {n} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper then lower 32 bits
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        elif n < -1:
            raise RDataError(f"invalid vector length {n} at offset {self.pos - 4}")
        return n


def _read_header(r: _Reader) -> int:
    fmt = r.take(2)
    if fmt != b"X\n":
        kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(fmt, f"unknown ({fmt!r})")
        raise RDataError(f"unsupported R serialization format {kind}; only XDR ('X\\n') is supported")
    version = r.int()
    r.int()  # R version that wrote it
    r.int()  # minimal R version to read it
    if version == 3:
        r.take(r.int())  # native encoding name, e.g. b"UTF-8"
    elif version != 2:
        raise RDataError(f"unsupported R serialization version {version} (expected 2 or 3)")
    return version


def unserialize(data: bytes) -> RObject | None:
    """Parse one (already decompressed) XDR serialization; returns None for R's NULL."""
    r = _Reader(data)
    _read_header(r)
    obj = _read_item(r)
    if r.pos != len(data):
        raise RDataError(f"{len(data) - r.pos} trailing bytes after the R serialization")
    return obj


def _read_item(r: _Reader) -> Any:
    flags = r.int()
    sexptype = flags & 0xFF
    if sexptype == NILVALUE_SXP:
        return None
    if sexptype == REFSXP:
        index = (flags >> 8) or r.int()
        if not 1 <= index <= len(r.refs):
            raise RDataError(f"REFSXP index {index} out of range (table has {len(r.refs)})")
        return r.refs[index - 1]
    if sexptype == SYMSXP:
        name = _read_item(r)
        sym = RObject(SYMSXP, name.value if isinstance(name, RObject) else None)
        r.refs.append(sym)
        return sym
    if sexptype == LISTSXP:
        return _read_pairlist(r, flags)
    if sexptype == CHARSXP:
        return RObject(CHARSXP, _read_charsxp(r, flags))
    if sexptype in _VECTOR_TYPES:
        obj = RObject(sexptype, _read_vector(r, sexptype))
        if flags & _HAS_ATTR:
            obj.attributes = _attributes(_read_item(r))
        return obj
    raise RDataError(f"unsupported R SEXP type {_TYPE_NAMES.get(sexptype, sexptype)} (code {sexptype})")


def _read_pairlist(r: _Reader, flags: int) -> RObject:
    """A LISTSXP chain, read iteratively: [attr] [tag] CAR, then CDR (another LISTSXP or NILVALUE)."""
    cells: list[tuple[str | None, Any]] = []
    attributes: dict[str, Any] = {}
    while True:
        if flags & _HAS_ATTR:
            attrs = _attributes(_read_item(r))
            attributes = attributes or attrs  # attributes of the head cell describe the pairlist
        tag = _read_item(r) if flags & _HAS_TAG else None
        tag_name = tag.value if isinstance(tag, RObject) else None
        cells.append((tag_name, _read_item(r)))
        flags = r.int()
        if flags & 0xFF == NILVALUE_SXP:
            return RObject(LISTSXP, cells, attributes)
        if flags & 0xFF != LISTSXP:
            r.pos -= 4
            raise RDataError(f"pairlist tail of type {_TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}")


def _attributes(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, RObject) or obj.sexptype != LISTSXP:
        raise RDataError("attributes are not a pairlist")
    return {str(tag): value for tag, value in obj.value}


def _read_charsxp(r: _Reader, flags: int) -> str | None:
    n = r.int()
    if n == -1:
        return None  # NA_character_
    raw = r.take(n)
    levels = flags >> 12
    if levels & _LATIN1:
        return raw.decode("latin-1")
    if levels & _BYTES:
        return raw.decode("latin-1")  # raw bytes: keep a lossless 1:1 mapping
    return raw.decode("utf-8", errors="replace")  # UTF-8, ASCII or native (assumed UTF-8)


def _read_vector(r: _Reader, sexptype: int) -> list[Any]:
    n = r.length()
    if sexptype in (LGLSXP, INTSXP):
        values = struct.unpack(f">{n}i", r.take(4 * n))
        if sexptype == LGLSXP:
            return [None if v == _NA_INTEGER else bool(v) for v in values]
        return [None if v == _NA_INTEGER else v for v in values]
    if sexptype == REALSXP:
        return list(struct.unpack(f">{n}d", r.take(8 * n)))
    items = [_read_item(r) for _ in range(n)]
    if sexptype == STRSXP:
        if any(not isinstance(x, RObject) or x.sexptype != CHARSXP for x in items):
            raise RDataError("STRSXP element is not a CHARSXP")
        return [x.value for x in items]
    return items


def decompress(data: bytes) -> bytes:
    """Undo whichever compression R used for an .rds/.rdx file (gzip, zlib, bzip2, xz or none)."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
        if data[:2] in (b"X\n", b"A\n", b"B\n"):
            return data
        return zlib.decompress(data)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise RDataError(f"cannot decompress R data: {exc}") from exc


def read_rds(path: Path) -> RObject | None:
    """Read a (possibly compressed) single-object serialization such as an ``.rds`` or ``.rdx`` file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RDataError(f"cannot read R data file {path}: {exc.strerror or exc}") from exc
    return unserialize(decompress(data))


class LazyLoadDB:
    """An R lazy-load database (``<base>.rdx`` index + ``<base>.rdb`` blobs), e.g. a package's data."""

    def __init__(self, rdx: Path, rdb: Path | None = None) -> None:
        self.rdx = Path(rdx)
        self.rdb = Path(rdb) if rdb is not None else self.rdx.with_suffix(".rdb")
        index = read_rds(self.rdx)
        if not isinstance(index, RObject):
            raise RDataError(f"{self.rdx} does not hold a lazy-load index")
        parts = index.as_dict()
        if "variables" not in parts:
            raise RDataError(f"{self.rdx} has no 'variables' entry; not a lazy-load index")
        self.variables: dict[str, tuple[int, int]] = {}
        for name, entry in parts["variables"].as_dict().items():
            offset, length = _offset_length(entry, name)
            self.variables[name] = (offset, length)
        self.compressed = _compression_code(parts.get("compressed"))

    @property
    def names(self) -> list[str]:
        return list(self.variables)

    def load(self, name: str) -> RObject | None:
        """Deserialize the object called ``name``."""
        if name not in self.variables:
            raise RDataError(f"object {name!r} not in {self.rdx} (has: {', '.join(self.variables)})")
        offset, length = self.variables[name]
        try:
            with self.rdb.open("rb") as fh:
                fh.seek(offset)
                blob = fh.read(length)
        except OSError as exc:
            raise RDataError(f"cannot read {self.rdb}: {exc.strerror or exc}") from exc
        if len(blob) != length:
            raise RDataError(f"{self.rdb} is truncated at object {name!r}")
        return unserialize(_inflate_entry(blob, self.compressed))


def _offset_length(entry: Any, name: str) -> tuple[int, int]:
    values = entry.value if isinstance(entry, RObject) else None
    if not values or len(values) != 2 or any(v is None or not math.isfinite(v) for v in values):
        raise RDataError(f"bad lazy-load index entry for {name!r}")
    return int(values[0]), int(values[1])


def _compression_code(entry: Any) -> int:
    if entry is None:
        return 1
    value = entry.value[0] if isinstance(entry, RObject) and entry.value else None
    if value is None:
        raise RDataError("bad 'compressed' entry in lazy-load index")
    return int(value)


_DECOMPRESSORS = {b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}


def _inflate_entry(blob: bytes, compressed: int) -> bytes:
    """Undo R_compress{1,2,3}: 4-byte length, then zlib (1) or a type tag and the stream (2, 3)."""
    if compressed == 0:
        return blob  # stored without compression or length header
    if compressed not in (1, 2, 3) or len(blob) < 5:
        raise RDataError(f"unsupported lazy-load compression code {compressed} or truncated entry")
    expected = struct.unpack(">I", blob[:4])[0]
    tag, body = (b"1", blob[4:]) if compressed == 1 else (blob[4:5], blob[5:])
    if tag not in _DECOMPRESSORS:
        raise RDataError(f"unknown lazy-load entry compression tag {tag!r}")
    try:
        out = _DECOMPRESSORS[tag](body)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RDataError(f"cannot decompress lazy-load entry: {exc}") from exc
    if len(out) != expected:
        raise RDataError(f"lazy-load entry inflated to {len(out)} bytes, header says {expected}")
    return out
