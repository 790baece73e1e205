"""Cleaning: hard-wrapped lines into paragraphs, whitespace collapsed, ``_italics_`` underscores dropped (see
:mod:`headkv.models.text`)."""

from __future__ import annotations

import re

PARAGRAPH_SEP = "\n\n"  # paragraphs and documents are joined by it

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


