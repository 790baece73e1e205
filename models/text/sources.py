"""The text sources (see :mod:`headkv.models.text`): the Austen novels (Debian's R package), ``pydoc``,
``debian-reference`` (Debian's HTML book), the Hugging Face corpora and local ``.txt`` files or folders, each
read into cleaned documents of one split."""

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
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from headkv.models import common
from headkv.models.common import HeadkvError, atomic_write
from headkv.models.text.clean import PARAGRAPH_SEP as _PARAGRAPH_SEP
from headkv.models.text.clean import paragraphs_from_lines, paragraphs_from_text
from headkv.models.text.htmltext import html_paragraphs

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
_SPLIT_ALIASES = {"train": "train", "eval": "eval", "test": "eval"}


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


