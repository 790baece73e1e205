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
