"""Text corpora for evaluation and training, turned into fixed-length token blocks.

Sources (the ``source`` argument): ``austen`` (the offline default: six Jane Austen novels from Debian's
``r-cran-janeaustenr``, fixed split :data:`AUSTEN_SPLITS`), ``pydoc`` and ``debian-reference`` (offline
non-fiction, documents alternating eval/train: :data:`NONFICTION_EVAL_EVERY`), ``wikitext-2-raw-v1``,
``pg19`` (Hugging Face) and a path (a ``.txt`` file or a folder of them, strict UTF-8 unless an ``encoding``
is given). Split names are ``train`` and ``eval`` (``test`` is an alias of ``eval``). Paragraphs are cleaned
and tokenized separately (no BOS), joined by the tokens of ``"\\n\\n"``, and cached under
``$HEADKV_CACHE/tokens``. :func:`token_blocks`: ``n_blocks`` non-overlapping blocks of exactly ``seq_len``
tokens, each starting at a paragraph start, spread evenly over the split.

Design: docs/design.md, section 'Text corpora and token blocks'.
"""

from headkv.models.text.blocks import available_blocks, long_stream, select_block_starts, token_blocks
from headkv.models.text.clean import clean_paragraph, paragraphs_from_lines, paragraphs_from_text
from headkv.models.text.htmltext import html_paragraphs
from headkv.models.text.sources import (
    AUSTEN_SPLITS,
    NONFICTION_SOURCES,
    CorpusError,
    describe,
    fetch_austen,
    fetch_debian_reference,
    load_documents,
)
from headkv.models.text.tokens import TokenizedSplit, bos_id, tokenize_documents, tokenized_split

__all__ = [
    "AUSTEN_SPLITS",
    "CorpusError",
    "NONFICTION_SOURCES",
    "TokenizedSplit",
    "available_blocks",
    "bos_id",
    "clean_paragraph",
    "describe",
    "fetch_austen",
    "fetch_debian_reference",
    "html_paragraphs",
    "load_documents",
    "long_stream",
    "paragraphs_from_lines",
    "paragraphs_from_text",
    "select_block_starts",
    "token_blocks",
    "tokenize_documents",
    "tokenized_split",
]
