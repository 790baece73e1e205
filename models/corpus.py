"""Text corpora for evaluation and training, turned into fixed-length token blocks.

Sources (``source`` argument):

``austen`` (offline default)
    Six Jane Austen novels from Debian's ``r-cran-janeaustenr`` package, fetched once with
    ``apt-get download`` + ``dpkg-deb -x`` into ``$HEADKV_CACHE/austen`` (default
    ``~/.cache/headkv/austen``).  The package stores them as an R lazy-load database
    (``data/Rdata.rdx`` index + ``Rdata.rdb`` entries), read with the ``rdata`` package; only the
    zlib framing of an ``.rdb`` entry is undone here.  Fixed split (:data:`AUSTEN_SPLITS`):
    **eval** = *Persuasion* + *Northanger Abbey* (~222k SmolLM2 tokens); **train** = *Emma*,
    *Mansfield Park*, *Pride and Prejudice*, *Sense and Sensibility*.
``pydoc`` (offline, non-fiction)
    The Python language and library reference topics shipped in the standard library
    (``pydoc_data.topics.topics``, the text ``help("with")`` prints; ~106k SmolLM2 tokens on Python 3.11),
    no download.  A document is one topic, in sorted-name order; a text shared by several names (``if``
    and ``else``) is kept once, under its first name, so no text is in both splits.  Cleaned like a
    ``.txt`` file (hard-wrapped lines joined, so indented code and grammar blocks become one line each) but
    without the ``_italics_`` rule (it would eat the underscores of ``__init__``).  The token-cache key
    holds a digest of the text, so another Python version's topics are tokenized afresh.
``debian-reference`` (offline, non-fiction)
    The *Debian Reference* book (Osamu Aoki; system administration) from Debian's
    ``debian-reference-en`` package (~1.7 MB .deb), fetched once with ``apt-get download`` +
    ``dpkg-deb -x`` into ``$HEADKV_CACHE/debian-reference`` (the chapter HTML files, then a ``MANIFEST``
    naming them in book order, written last as the completion marker).  A document is one chapter
    (preface, chapters 1-12, appendix A; the table-of-contents page is skipped), converted from XHTML with
    :mod:`html.parser`: navigation headers/footers and per-chapter tables of contents are dropped; each
    heading, paragraph, list item, definition term/description and table caption is a paragraph with its
    whitespace collapsed; a ``<pre>`` block (commands, config files) keeps its lines (trailing spaces and
    common indentation removed); a table is one paragraph with one line per row, cells joined by
    ``" | "``.  The token-cache key holds a digest of the HTML files.
    **Split of both** (:data:`NONFICTION_EVAL_EVERY`): documents alternate, the ones at positions
    0, 2, 4, ... of the order above are **eval**, those at 1, 3, 5, ... **train**; the two never share
    a document.  (They are meant for evaluating allocations trained on Austen; **train** is the held-out
    half for in-domain fitting.)
``wikitext-2-raw-v1``
    Hugging Face ``Salesforce/wikitext`` (config ``wikitext-2-raw-v1``); train -> ``train``,
    eval -> ``test``.  Lines are grouped into articles at top-level ``= Title =`` headings; each non-empty
    line is a paragraph; the text is otherwise kept raw.
``pg19``
    Hugging Face ``emozilla/pg19`` (fallback ``deepmind/pg19``), streamed; eval -> ``test`` (all 100
    books), train -> the first :data:`PG19_MAX_TRAIN_BOOKS` books of ``train``.
a path
    A ``.txt`` file or a directory searched recursively for ``*.txt`` (sorted by relative path).
    Directory with >= 2 files: file-level split, the files at sorted positions 0, 5, 10, ... are
    **eval**, the rest **train**.  A single file (or a directory holding one): its last 20% of
    paragraphs are **eval**, the first 80% **train**.  Files are decoded as strict UTF-8 unless an
    ``encoding`` is given (a file that does not decode is a :class:`CorpusError` naming the byte offset);
    the encoding is part of the token-cache key.  ``encoding`` is ignored for the named corpora.

Split names are ``train`` and ``eval`` (``test`` is an alias of ``eval``).

Cleaning: lines separated by blank lines form paragraphs; hard-wrapped lines are joined with a space,
whitespace is collapsed, and Gutenberg-style ``_italics_`` underscores are removed (not for wikitext or
the non-fiction corpora; ``debian-reference`` is cleaned from HTML as described above).  For Austen the
front matter before the first chapter heading, full-bracket editorial notes such as
``[End volume one of this edition.]`` and the Signet "A NOTE ON THE TEXT" appendix of *Northanger Abbey*
are dropped.  A document is its paragraphs joined with ``"\\n\\n"``.  (Measured: evaluating on the raw
hard-wrapped lines gives artificially low perplexity.)

Tokenization: each paragraph is tokenized separately without special tokens (no BOS), and paragraphs
and documents are joined by the tokens the separator ``"\\n\\n"`` gets between two words, so the stream
matches tokenizing the joined text (for byte-level BPE tokenizers that split at newlines) while the
offsets of paragraph starts are known.  The stream, paragraph starts and document starts are cached
per (source, encoding, split, tokenizer name/size/fingerprint) as ``$HEADKV_CACHE/tokens/*.pt``.

Blocks (:func:`token_blocks`): ``n_blocks`` non-overlapping windows of exactly ``seq_len`` tokens, each
starting at a paragraph start, spread evenly over the split's concatenated token stream (block ``i``
is centred as near as possible to the centre of the ``i``-th of ``n_blocks`` equal segments; ``seed``
only shifts that phase).  Blocks may run across a document boundary (documents are ``"\\n\\n"``-joined).
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from models import common
from models.common import HeadkvError, atomic_write

__all__ = [
    "AUSTEN_SPLITS",
    "CorpusError",
    "NONFICTION_SOURCES",
    "available_blocks",
    "describe",
    "fetch_austen",
    "fetch_debian_reference",
    "load_documents",
    "long_stream",
    "token_blocks",
]

log = logging.getLogger(__name__)

AUSTEN_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"),
    "eval": ("persuasion", "northangerabbey"),
}  # the split name "test" is accepted everywhere as an alias of "eval"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_FILES = ("Rdata.rdx", "Rdata.rdb")
NONFICTION_SOURCES = ("pydoc", "debian-reference")
NONFICTION_EVAL_EVERY = 2  # pydoc / debian-reference: documents 0, 2, 4, ... are eval, 1, 3, 5, ... train
DEBIAN_REFERENCE_PACKAGE = "debian-reference-en"
DEBIAN_REFERENCE_MANIFEST = "MANIFEST"  # chapter file names in book order; written last = complete
HF_SOURCES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "wikitext-2-raw-v1": (("Salesforce/wikitext", "wikitext"), "wikitext-2-raw-v1"),
    "pg19": (("emozilla/pg19", "deepmind/pg19"), None),
}
PG19_MAX_TRAIN_BOOKS = 200
LOCAL_EVAL_EVERY = 5  # directory sources: sorted files 0, 5, 10, ... are eval
LOCAL_TRAIN_FRACTION = 0.8  # single-file sources: first 80% of paragraphs are train
_CACHE_FORMAT = 1  # bump when cleaning or tokenization changes, to invalidate token caches
_SPLIT_ALIASES = {"train": "train", "eval": "eval", "test": "eval"}
_PARAGRAPH_SEP = "\n\n"
_GOLDEN = 0.6180339887498949


class CorpusError(HeadkvError):
    """A corpus could not be located, fetched, parsed, decoded or split. Messages are one clear line."""


def _codec(encoding: str | None) -> str:
    """The canonical codec name of ``encoding`` (``None`` = strict UTF-8); unknown names are errors."""
    if encoding is None:
        return "utf-8"
    try:
        name = codecs.lookup(encoding).name
        try:
            b"x".decode(name)  # LookupError for codecs that are not text encodings (rot13, hex, ...)
        except UnicodeError:
            pass  # a text encoding that just cannot decode this probe (utf-16, ...)
        return name
    except (LookupError, TypeError) as exc:
        raise CorpusError(f"unknown text encoding {encoding!r} (e.g. 'utf-8', 'latin-1', 'cp1252')") from exc


def _is_named(source: str) -> bool:
    return source == "austen" or source in NONFICTION_SOURCES or source in HF_SOURCES


def _canonical_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise CorpusError(f"unknown split {split!r}; use 'train' or 'eval' ('test' = 'eval')")
    return _SPLIT_ALIASES[split]


# --------------------------------------------------------------------------- austen


def fetch_austen(cache_dir: Path | None = None) -> Path:
    """Return the directory holding ``Rdata.rdx``/``Rdata.rdb``, fetching them via apt if missing."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else common.cache_dir() / "austen"
    if all((target / name).is_file() for name in AUSTEN_FILES):
        return target
    log.info("fetching %s with apt-get into %s", AUSTEN_PACKAGE, target)
    instead = "use a local .txt corpus path instead"
    with _apt_package(AUSTEN_PACKAGE, "the austen corpus", instead) as (deb, root):
        target.mkdir(parents=True, exist_ok=True)
        found = sorted(root.rglob("janeaustenr/data/Rdata.rdx"))
        if not found:
            raise CorpusError(f"{deb.name} does not contain janeaustenr/data/Rdata.rdx")
        for name in reversed(AUSTEN_FILES):  # .rdb first: the .rdx is the "complete" marker
            _atomic_copy(found[0].parent / name, target / name)
    return target


@contextmanager
def _apt_package(package: str, what: str, instead: str) -> Iterator[tuple[Path, Path]]:
    """``apt-get download PACKAGE`` and ``dpkg-deb -x`` it in a temporary folder; yields (the .deb, the
    extracted root), removed on exit. Without apt-get or dpkg-deb: one CorpusError saying what to use
    ``instead``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"cannot fetch {what}: {tool!r} not found (needs a Debian/Ubuntu system); {instead}"
            )
    with tempfile.TemporaryDirectory(prefix="headkv-apt-") as name:
        tmp = Path(name)
        _run_tool(["apt-get", "download", package], tmp, what)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise CorpusError(f"apt-get download {package} produced no .deb file")
        _run_tool(["dpkg-deb", "-x", str(debs[0]), "root"], tmp, what)
        yield debs[0], tmp / "root"


def _run_tool(cmd: list[str], cwd: Path, what: str = "the austen corpus") -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(f"cannot fetch {what}: {' '.join(cmd)} failed: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E:")] or lines or ["no output"]
        raise CorpusError(
            f"cannot fetch {what}: '{' '.join(cmd)}' exited with {proc.returncode}: "
            f"{errors[-1]} (try 'apt-get update', or use a local .txt corpus path)"
        )


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _from_r(what: str, data: bytes) -> Any:
    """``rdata`` parse + convert of one (possibly gzip-compressed) R serialization; any failure of the
    library becomes one CorpusError line."""
    import rdata  # lazy: only the austen corpus needs it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" and the like
            return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))
    except Exception as exc:  # noqa: BLE001 - rdata raises many types on damaged input; all mean "damaged"
        module, kind = type(exc).__module__, type(exc).__name__
        kind = kind if module == "builtins" else f"{module}.{kind}"  # e.g. zlib.error
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CorpusError(f"cannot read {what} ({kind}: {detail}); damaged file?") from exc


def _inflate_entry(blob: bytes, where: str) -> bytes:
    """An ``.rdb`` entry of a zlib-compressed lazy-load database (R_compress1): 4-byte big-endian
    uncompressed length, then a zlib stream.  ``rdata`` reads the serialization but not this framing."""
    if len(blob) < 5:
        raise CorpusError(f"{where} is truncated")
    try:
        data = zlib.decompress(blob[4:])
    except zlib.error as exc:
        raise CorpusError(f"cannot decompress {where}: {exc}") from exc
    expected = struct.unpack(">I", blob[:4])[0]
    if len(data) != expected:
        raise CorpusError(f"{where} inflated to {len(data)} bytes, its header says {expected}")
    return data


def _read_bytes(path: Path, offset: int = 0, length: int = -1) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _lazyload_index(rdx: Path) -> dict[str, tuple[int, int]]:
    """Object name -> (offset, length) of its entry in the ``.rdb`` beside the index ``rdx``."""
    index = _from_r(f"lazy-load index {rdx}", _read_bytes(rdx))
    try:
        variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
        compressed = int(np.ravel(index.get("compressed", 1))[0])
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as exc:
        raise CorpusError(f"{rdx} is not an R lazy-load index ({type(exc).__name__}: {exc})") from exc
    if compressed != 1:
        raise CorpusError(f"{rdx}: lazy-load compression {compressed} not supported (only zlib, 1)")
    return variables


def load_austen_novel(name: str, cache_dir: Path | None = None) -> list[str]:
    """The raw lines (one hard-wrapped line per element) of one novel, e.g. ``"persuasion"``."""
    folder = fetch_austen(cache_dir)
    rdx, rdb = folder / "Rdata.rdx", folder / "Rdata.rdb"
    variables = _lazyload_index(rdx)
    if name not in variables:
        raise CorpusError(f"object {name!r} not in {rdx} (has: {', '.join(variables)})")
    offset, length = variables[name]
    blob = _read_bytes(rdb, offset, length)
    where = f"entry {name!r} of {rdb}"
    if len(blob) != length:
        raise CorpusError(f"{where} is truncated")
    lines = _from_r(where, _inflate_entry(blob, where))
    if not isinstance(lines, np.ndarray) or lines.ndim != 1 or lines.dtype.kind not in "UO":
        raise CorpusError(f"janeaustenr object {name!r} is not a character vector")
    if any(line is not None and not isinstance(line, str) for line in lines):
        raise CorpusError(f"janeaustenr object {name!r} is not a character vector")
    return ["" if line is None else str(line) for line in lines]


def _strip_austen_boilerplate(paragraphs: list[str]) -> list[str]:
    """Drop front matter before the first chapter heading, editorial [notes] and the Signet appendix."""
    first = next((i for i, p in enumerate(paragraphs) if re.match(r"(?i)chapter\b", p)), 0)
    body = paragraphs[first:]
    if "A NOTE ON THE TEXT" in body:
        body = body[: body.index("A NOTE ON THE TEXT")]
    return [p for p in body if not (p.startswith("[") and p.endswith("]"))]


# --------------------------------------------------------------------------- pydoc, debian-reference


def _pydoc_topics() -> list[tuple[str, str]]:
    """(topic name, text) of the standard library's ``pydoc_data.topics``, sorted by name; a text that
    several names share is kept once, under the first."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data off the standard library
        raise CorpusError(f"corpus 'pydoc' needs the standard library's pydoc_data module ({exc})") from exc
    if not isinstance(topics, dict) or not topics:
        raise CorpusError("pydoc_data.topics.topics is not a non-empty dict of topic texts")
    unique: dict[str, str] = {}
    for name in sorted(topics):
        unique.setdefault(str(topics[name]), str(name))
    return [(name, text) for text, name in unique.items()]


def _chapter_key(name: str) -> tuple[int, str]:
    """Book order of the debian-reference HTML pages: preface (pr*), chapters (ch*), appendices (ap*)."""
    return ({"pr": 0, "ch": 1, "ap": 2}.get(name[:2], 3), name)


def fetch_debian_reference(cache_dir: Path | None = None) -> Path:
    """Return the directory holding the Debian Reference chapter pages (``*.en.html``) and their
    ``MANIFEST``, fetching ``debian-reference-en`` via apt if the manifest is missing."""
    target = (
        Path(cache_dir).expanduser() if cache_dir is not None else common.cache_dir() / "debian-reference"
    )
    if (target / DEBIAN_REFERENCE_MANIFEST).is_file():
        return target
    log.info("fetching %s with apt-get into %s", DEBIAN_REFERENCE_PACKAGE, target)
    instead = "use --corpus pydoc or a local .txt corpus path instead"
    with _apt_package(DEBIAN_REFERENCE_PACKAGE, "the debian-reference corpus", instead) as (deb, root):
        target.mkdir(parents=True, exist_ok=True)
        pages = [
            p
            for p in root.rglob("usr/share/debian-reference/*.en.html")
            if p.is_file() and p.name[:2] in ("pr", "ch", "ap")
        ]
        if not any(p.name.startswith("ch") for p in pages):
            raise CorpusError(f"{deb.name} does not contain usr/share/debian-reference/ch*.en.html")
        pages.sort(key=lambda p: _chapter_key(p.name))
        for page in pages:
            _atomic_copy(page, target / page.name)
        names = "".join(f"{p.name}\n" for p in pages)
        atomic_write(target / DEBIAN_REFERENCE_MANIFEST, lambda tmp_file: tmp_file.write_text(names))
    return target


def _debian_reference_pages(cache_dir: Path | None = None) -> list[Path]:
    folder = fetch_debian_reference(cache_dir)
    manifest = folder / DEBIAN_REFERENCE_MANIFEST
    names = [n.strip() for n in _read_text(manifest).splitlines() if n.strip()]
    if not names or any("/" in n or n.startswith(".") for n in names):
        raise CorpusError(f"{manifest} is damaged; delete {folder} to fetch the corpus again")
    pages = [folder / n for n in names]
    missing = [p.name for p in pages if not p.is_file()]
    if missing:
        raise CorpusError(f"{folder} lacks {missing[0]} listed in its MANIFEST; delete the folder to refetch")
    return pages


class _HtmlText(HTMLParser):
    """XHTML (DocBook output) -> paragraphs; see the ``debian-reference`` entry of the module docstring."""

    BLOCKS = frozenset(
        ["p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "div", "blockquote", "ul", "ol", "dl"]
        + ["body", "caption"]
    )
    SKIP_CLASSES = frozenset({"navheader", "navfooter", "toc"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._text: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, opens a skipped region)
        self._skip = 0
        self._pre = 0
        self._row: list[str] | None = None
        self._rows: list[str] | None = None

    def _flush(self) -> None:
        text = "".join(self._text)
        self._text = []
        if self._pre:
            return
        if self._row is not None:  # inside a table cell: the text belongs to the cell
            if text.strip():
                self._row.append(" ".join(text.split()))
            return
        if text.strip():
            self.paragraphs.append(" ".join(text.split()))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in ("head", "script", "style") or (tag == "div" and bool(classes & self.SKIP_CLASSES))
        self._stack.append((tag, skip))
        if skip:
            self._skip += 1
        if self._skip:
            return
        if tag == "pre":
            self._flush()
            self._pre += 1
        elif tag == "table":
            self._flush()
            self._rows = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") or tag in self.BLOCKS:
            self._flush()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip and tag == "br":
            self._text.append("\n" if self._pre else " ")

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self._stack):
            return  # a stray end tag
        while self._stack:
            open_tag, skip = self._stack.pop()
            if not self._skip:
                self._close(open_tag)
            if skip:
                self._skip -= 1
            if open_tag == tag:
                break

    def _close(self, tag: str) -> None:
        if tag == "pre" and self._pre:
            self._pre -= 1
            if not self._pre:
                lines = [ln.rstrip() for ln in "".join(self._text).expandtabs().split("\n")]
                while lines and not lines[0]:
                    lines.pop(0)
                while lines and not lines[-1]:
                    lines.pop()
                indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln), default=0)
                block = "\n".join(ln[indent:] for ln in lines)
                block = re.sub(r"\n{2,}", "\n", block)  # a blank line would split the block in two
                self._text = []
                if block and self._row is not None:
                    self._row.append(" ".join(block.split()))  # a table cell is one line
                elif block:
                    self.paragraphs.append(block)
        elif tag in ("td", "th"):
            self._flush()
        elif tag == "tr" and self._row is not None:
            self._flush()
            if self._rows is not None and self._row:
                self._rows.append(" | ".join(self._row))
            self._row = None
        elif tag == "table" and self._rows is not None:
            if self._rows:
                self.paragraphs.append("\n".join(self._rows))
            self._rows = None
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._text.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(html: str) -> list[str]:
    """The paragraphs of one XHTML page (see the ``debian-reference`` entry of the module docstring)."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def _nonfiction_documents(source: str) -> list[str]:
    """All documents of ``pydoc`` or ``debian-reference`` in their fixed order (before the split)."""
    if source == "pydoc":
        return [_PARAGRAPH_SEP.join(paragraphs_from_text(text, italics=False)) for _, text in _pydoc_topics()]
    return [_PARAGRAPH_SEP.join(html_paragraphs(_read_text(page))) for page in _debian_reference_pages()]


def _nonfiction_fingerprint(source: str) -> str:
    """Name plus a digest of the raw content (topics text, or the HTML pages) for the token-cache key."""
    digest = hashlib.sha1()
    if source == "pydoc":
        for name, text in _pydoc_topics():
            digest.update(f"{name}\0{text}\0".encode())
    else:
        for page in _debian_reference_pages():
            digest.update(page.name.encode() + b"\0" + _read_bytes(page) + b"\0")
    return f"{source}|sha1={digest.hexdigest()[:16]}"


# --------------------------------------------------------------------------- cleaning

_ITALIC_OPEN = re.compile(r"(?<![\w_])_+(?=[^\s_])")
_ITALIC_CLOSE = re.compile(r"(?<=[^\s_])_+(?![\w_])")


def clean_paragraph(text: str, italics: bool = True) -> str:
    """Join a hard-wrapped paragraph into one line; optionally drop ``_italics_`` underscores."""
    if italics:
        text = _ITALIC_CLOSE.sub("", _ITALIC_OPEN.sub("", text))
    return " ".join(text.split())


def paragraphs_from_lines(lines: list[str], italics: bool = True) -> list[str]:
    """Group hard-wrapped lines into cleaned paragraphs; blank lines separate paragraphs."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(clean_paragraph(" ".join(current), italics))
            current = []
    return [p for p in paragraphs if p]


def paragraphs_from_text(text: str, italics: bool = True) -> list[str]:
    return paragraphs_from_lines(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), italics)


# --------------------------------------------------------------------------- documents


def load_documents(source: str, split: str = "eval", *, encoding: str | None = None) -> list[str]:
    """The cleaned documents (paragraphs joined by ``"\\n\\n"``) of one split of a source.

    ``encoding`` decodes local ``.txt`` files (default: strict UTF-8); the named corpora ignore it."""
    split = _canonical_split(split)
    codec = _codec(encoding)
    if source == "austen":
        docs = []
        for name in AUSTEN_SPLITS[split]:
            docs.append(
                _PARAGRAPH_SEP.join(_strip_austen_boilerplate(paragraphs_from_lines(load_austen_novel(name))))
            )
    elif source in NONFICTION_SOURCES:
        docs = [
            d
            for i, d in enumerate(_nonfiction_documents(source))
            if (i % NONFICTION_EVAL_EVERY == 0) == (split == "eval")
        ]
    elif source in HF_SOURCES:
        docs = _load_hf_documents(source, split)
    else:
        docs = _load_local_documents(_resolve_path(source), split, codec)
    docs = [d for d in docs if d]
    if not docs:
        raise CorpusError(f"split {split!r} of corpus {describe(source, encoding=encoding)} holds no text")
    return docs


def describe(source: str, *, encoding: str | None = None) -> str:
    """A short stable name for results files: the corpus name, or the resolved path of a local corpus
    (followed by `` (encoding NAME)`` when it is read with an encoding other than UTF-8)."""
    codec = _codec(encoding)
    if _is_named(source):
        return source
    path = str(_resolve_path(source))
    return path if codec == "utf-8" else f"{path} (encoding {codec})"


def _resolve_path(source: str) -> Path:
    """A local corpus: an existing .txt file or a folder of them (not '', a device or a pipe)."""
    path = Path(source).expanduser()
    if not source.strip():
        raise CorpusError("the corpus name is empty (give a corpus name, a .txt file or a folder)")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise CorpusError(f"corpus {source} is not a regular file or a folder (a device or pipe)")
    if not path.exists():
        known = ", ".join(["austen", *NONFICTION_SOURCES, *HF_SOURCES])
        raise CorpusError(f"corpus path not found: {source} (known corpora: {known}, or a .txt file/dir)")
    return path.resolve()


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        (p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
    )
    if not files:
        raise CorpusError(f"no .txt files under corpus directory {path}")
    return files


def _read_text(path: Path, codec: str = "utf-8") -> str:
    """The file decoded strictly with ``codec``; a byte that does not decode is one CorpusError line."""
    data = _read_bytes(path)
    try:
        return data.decode(codec)
    except UnicodeError as exc:
        start = getattr(exc, "start", 0)
        bad = data[start : max(getattr(exc, "end", start + 1), start + 1)][:8].hex(" ")
        raise CorpusError(
            f"corpus file {path} is not valid {codec} at byte offset {start} (0x{bad}); "
            f"give its encoding, e.g. encoding='latin-1' (--encoding latin-1)"
        ) from None


def _load_local_documents(path: Path, split: str, codec: str = "utf-8") -> list[str]:
    files = _local_files(path)
    if len(files) >= 2:
        chosen = [f for i, f in enumerate(files) if (i % LOCAL_EVAL_EVERY == 0) == (split == "eval")]
        return [_PARAGRAPH_SEP.join(paragraphs_from_text(_read_text(f, codec))) for f in chosen]
    paragraphs = paragraphs_from_text(_read_text(files[0], codec))
    if not paragraphs:
        raise CorpusError(f"corpus file {files[0]} holds no text")
    n_train = min(len(paragraphs) - 1, round(LOCAL_TRAIN_FRACTION * len(paragraphs)))
    part = paragraphs[:n_train] if split == "train" else paragraphs[n_train:]
    return [_PARAGRAPH_SEP.join(part)]


# --------------------------------------------------------------------------- Hugging Face


def _hf_load(source: str, split: str, streaming: bool) -> Any:
    """``datasets.load_dataset`` over the candidate repos; one clear CorpusError if none loads."""
    repos, config = HF_SOURCES[source]
    hf_split = "train" if split == "train" else "test"
    try:
        import datasets  # lazy: only needed for hub corpora
    except ImportError as exc:
        raise CorpusError(f"corpus {source!r} needs the 'datasets' package; use --corpus austen") from exc
    error: Exception | None = None
    for repo in repos:
        try:
            return datasets.load_dataset(repo, config, split=hf_split, streaming=streaming)
        except Exception as exc:  # noqa: BLE001 - any hub/network/cache failure gets the same advice
            error = exc
            log.debug("load_dataset(%s, %s) failed: %r", repo, config, exc)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                break  # the hub is unreachable: a fallback repo would only repeat the slow retries
    raise _hf_error(source, error)


def _hf_error(source: str, error: Exception | None) -> CorpusError:
    detail = (str(error).strip().splitlines() or [""])[0][:160] if error is not None else ""
    kind = type(error).__name__ if error is not None else "error"
    return CorpusError(
        f"cannot load corpus {source!r} from the Hugging Face hub (offline or unreachable? "
        f"{kind}: {detail}); use --corpus austen or a local .txt path"
    )


def _load_hf_documents(source: str, split: str) -> list[str]:
    try:
        if source == "pg19":
            dataset = _hf_load(source, split, streaming=True)
            limit = PG19_MAX_TRAIN_BOOKS if split == "train" else None
            books = (row["text"] for _, row in zip(range(limit or 10**9), dataset, strict=False))
            return [_PARAGRAPH_SEP.join(paragraphs_from_text(text)) for text in books]
        return _wikitext_articles(list(_hf_load(source, split, streaming=False)["text"]))
    except CorpusError:
        raise
    except Exception as exc:  # e.g. a streamed download failing midway
        raise _hf_error(source, exc) from exc


def _wikitext_articles(lines: list[str]) -> list[str]:
    """Group wikitext rows into articles at top-level `` = Title = `` headings; rows are paragraphs."""
    articles: list[list[str]] = []
    for line in lines:
        text = " ".join(line.split())
        if not text:
            continue
        if re.fullmatch(r"= [^=].* =", text) or not articles:
            articles.append([])
        articles[-1].append(text)
    return [_PARAGRAPH_SEP.join(a) for a in articles]


# --------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedSplit:
    """A split's token stream with the offsets where paragraphs and documents begin."""

    ids: torch.Tensor  # (n_tokens,) int64
    para_starts: torch.Tensor  # sorted offsets of each paragraph's first token
    doc_starts: torch.Tensor  # sorted offsets of each document's first token


_MEMO: dict[str, TokenizedSplit] = {}


def bos_id(tokenizer: Any) -> int | None:
    """The BOS token id when the model's tokenizer adds one (encode with special tokens and look: never
    guessed from the family), else None. Blocks, streams and prompts then start with it at position 0."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _separator_ids(tokenizer: Any) -> list[int]:
    """Tokens of ``"\\n\\n"`` as they appear between two paragraphs (not at the end of a text)."""
    left, right, both = _encode(tokenizer, ["Alpha", "Beta", "Alpha" + _PARAGRAPH_SEP + "Beta"])
    if (
        both[: len(left)] == left
        and both[len(both) - len(right) :] == right
        and len(both) > len(left) + len(right)
    ):
        return both[len(left) : len(both) - len(right)]
    return _encode(tokenizer, [_PARAGRAPH_SEP])[0]


def tokenize_documents(tokenizer: Any, documents: list[str]) -> TokenizedSplit:
    """Tokenize paragraph by paragraph and join with the separator tokens (see module docstring)."""
    sep = _separator_ids(tokenizer)
    doc_paras = [[p for p in doc.split(_PARAGRAPH_SEP) if p.strip()] for doc in documents]
    encoded = iter(_encode(tokenizer, [p for paras in doc_paras for p in paras]))
    ids: list[int] = []
    para_starts: list[int] = []
    doc_starts: list[int] = []
    for paras in doc_paras:
        pieces = [piece for piece in (next(encoded) for _ in paras) if piece]
        if not pieces:
            continue
        if ids:
            ids.extend(sep)
        doc_starts.append(len(ids))
        for k, piece in enumerate(pieces):
            if k:
                ids.extend(sep)
            para_starts.append(len(ids))
            ids.extend(piece)
    return TokenizedSplit(*(torch.tensor(xs, dtype=torch.long) for xs in (ids, para_starts, doc_starts)))


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    probe = "Head-aware KV caches: 12,345 tokens.\n\nÉmile's naïve café -- _really_?"
    digest = hashlib.sha1(str(_encode(tokenizer, [probe])[0]).encode()).hexdigest()[:12]
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}|{name}|{len(tokenizer)}|{digest}"


def _source_fingerprint(source: str, codec: str = "utf-8") -> str:
    """The corpus identity in the token-cache key: the name (plus a content digest for ``pydoc`` and
    ``debian-reference``), or (local) path, encoding, file sizes/times."""
    if source in NONFICTION_SOURCES:
        return _nonfiction_fingerprint(source)
    if _is_named(source):
        return source
    path = _resolve_path(source)
    stats = []
    for f in _local_files(path):
        st = f.stat()
        stats.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{path}|encoding={codec}|{';'.join(stats)}"


def _cache_file(source: str, split: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(describe(source)).name)[:40] or "corpus"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return common.cache_dir() / "tokens" / f"{slug}-{split}-{digest}.pt"


def _load_cached(path: Path, key: str) -> TokenizedSplit | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        if data.get("key") == key:
            return TokenizedSplit(data["ids"], data["para_starts"], data["doc_starts"])
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed, never fatal
        log.warning("ignoring unreadable token cache %s: %s", path, exc)
    return None


def _save_cached(path: Path, key: str, split: TokenizedSplit) -> None:
    data = {"key": key, "ids": split.ids, "para_starts": split.para_starts, "doc_starts": split.doc_starts}
    try:
        atomic_write(path, lambda tmp: torch.save(data, tmp))
    except OSError as exc:
        log.warning("could not write token cache %s: %s", path, exc)


def tokenized_split(
    tokenizer: Any, source: str, split: str = "eval", *, encoding: str | None = None
) -> TokenizedSplit:
    """The (cached) token stream of one split; tokenizes the documents only on a cache miss."""
    split = _canonical_split(split)
    codec = _codec(encoding)
    key = "|".join(
        [f"v{_CACHE_FORMAT}", _source_fingerprint(source, codec), split, _tokenizer_fingerprint(tokenizer)]
    )
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file(source, split, key)
    result = _load_cached(path, key)
    if result is None:
        name = describe(source, encoding=encoding)
        log.info("tokenizing %s split of %s", split, name)
        result = tokenize_documents(tokenizer, load_documents(source, split, encoding=encoding))
        if result.ids.numel() == 0:
            raise CorpusError(f"split {split!r} of corpus {name} holds no tokens")
        _save_cached(path, key, result)
    if len(_MEMO) >= 8:
        _MEMO.clear()
    _MEMO[key] = result
    return result


# --------------------------------------------------------------------------- blocks


def _candidates(tokens: TokenizedSplit, seq_len: int) -> np.ndarray:
    starts = tokens.para_starts.numpy()
    return starts[starts + seq_len <= tokens.ids.numel()]


def _count_blocks(cands: np.ndarray, seq_len: int) -> int:
    """Most non-overlapping paragraph-aligned blocks: greedy earliest-first is optimal."""
    count, pos = 0, 0
    while True:
        j = int(np.searchsorted(cands, pos, side="left"))
        if j >= len(cands):
            return count
        count, pos = count + 1, int(cands[j]) + seq_len


def available_blocks(
    tokenizer: Any, source: str, split: str = "eval", seq_len: int = 1024, *, encoding: str | None = None
) -> int:
    """How many non-overlapping paragraph-aligned blocks of ``seq_len`` tokens the split holds."""
    if seq_len < 1:
        raise CorpusError(f"seq_len must be >= 1, got {seq_len}")
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    return _count_blocks(_candidates(tokens, seq_len), seq_len)


def _latest_starts(cands: np.ndarray, seq_len: int, n_blocks: int, total: int) -> list[int] | None:
    """Latest feasible start of each block (greedy from the end), or None if n_blocks do not fit."""
    latest = [0] * n_blocks
    limit = total
    for i in reversed(range(n_blocks)):
        j = int(np.searchsorted(cands, limit - seq_len, side="right")) - 1
        if j < 0:
            return None
        latest[i] = limit = int(cands[j])
    return latest


def select_block_starts(
    cands: np.ndarray, total: int, seq_len: int, n_blocks: int, seed: int = 0
) -> list[int]:
    """Evenly spread, non-overlapping starts from ``cands``; raises CorpusError if they do not fit."""
    latest = _latest_starts(cands, seq_len, n_blocks, total)
    if latest is None:
        raise CorpusError(
            f"only {_count_blocks(cands, seq_len)} non-overlapping blocks of {seq_len} tokens "
            f"available ({total} tokens), {n_blocks} requested"
        )
    phase = (0.5 + seed * _GOLDEN) % 1.0
    starts: list[int] = []
    prev_end = 0
    for i in range(n_blocks):
        target = max(prev_end, int((i + phase) * total / n_blocks - seq_len / 2))
        j = int(np.searchsorted(cands, target, side="left"))
        start = min(int(cands[j]) if j < len(cands) else latest[i], latest[i])
        starts.append(start)
        prev_end = start + seq_len
    return starts


def token_blocks(
    tokenizer: Any,
    source: str,
    split: str = "eval",
    seq_len: int = 1024,
    n_blocks: int = 8,
    seed: int = 0,
    *,
    encoding: str | None = None,
) -> torch.Tensor:
    """``(n_blocks, seq_len)`` int64 token ids: non-overlapping, paragraph-aligned, evenly spread. Where the
    tokenizer adds BOS (:func:`bos_id`) every block starts with it and ``seq_len`` counts it.

    ``encoding`` decodes a local ``.txt`` corpus (default: strict UTF-8); the named corpora ignore it."""
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    if body < 1 or n_blocks < 1:
        raise CorpusError(f"seq_len and n_blocks must be >= 1 (BOS counted), got {seq_len} and {n_blocks}")
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    total = tokens.ids.numel()
    try:
        starts = select_block_starts(_candidates(tokens, body), total, body, n_blocks, seed)
    except CorpusError as exc:
        raise CorpusError(f"{describe(source, encoding=encoding)} {_canonical_split(split)}: {exc}") from None
    blocks = torch.stack([tokens.ids[s : s + body] for s in starts]).long()
    return blocks if bos is None else torch.cat([torch.full((n_blocks, 1), bos, dtype=torch.long), blocks], 1)


def long_stream(
    tokenizer: Any, source: str, split: str = "eval", n_tokens: int = 32768, *, encoding: str | None = None
) -> torch.Tensor:
    """The first ``n_tokens`` of the split's concatenated token stream (documents ``"\\n\\n"``-joined), after
    the BOS token where the tokenizer adds one (:func:`bos_id`; counted in ``n_tokens``).

    ``encoding`` decodes a local ``.txt`` corpus (default: strict UTF-8); the named corpora ignore it."""
    if n_tokens < 1:
        raise CorpusError(f"n_tokens must be >= 1, got {n_tokens}")
    bos = bos_id(tokenizer)
    body = n_tokens - (bos is not None)
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    if tokens.ids.numel() < body:
        raise CorpusError(
            f"{describe(source, encoding=encoding)} {_canonical_split(split)} holds only "
            f"{tokens.ids.numel()} tokens, {n_tokens} requested"
        )
    ids = tokens.ids[:body].clone()
    return ids if bos is None else torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
