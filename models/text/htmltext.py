"""XHTML (the DocBook output of ``debian-reference``) to paragraphs: see the ``debian-reference`` entry of
:mod:`headkv.models.text`."""

from __future__ import annotations

import re
from html.parser import HTMLParser


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


