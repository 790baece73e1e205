"""Tokenization follows the model: where the tokenizer adds BOS, blocks, streams and prompts start with it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from headkv.alloc.passkey import build_task
from headkv.models.text import bos_id, long_stream, token_blocks
from tests.test_passkey import make_tiny_dir


@pytest.fixture(scope="module")
def tokenizers(smollm, tmp_path_factory):
    """The offline default's tokenizer (no BOS) and a copy whose post-processor adds its BOS token."""
    from tokenizers.processors import TemplateProcessing

    tok = smollm[1]
    with_bos = copy.deepcopy(tok)
    bos = with_bos.bos_token
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, with_bos.bos_token_id)])
    text = make_tiny_dir(tmp_path_factory.mktemp("bos"), tok) / "text.txt"
    return tok, with_bos, str(text)


def test_bos_is_read_off_the_tokenizer_not_guessed(tokenizers):
    tok, with_bos, _ = tokenizers
    assert bos_id(tok) is None  # SmolLM2's tokenizer adds none: blocks as before
    assert bos_id(with_bos) == with_bos.bos_token_id


def test_blocks_and_streams_start_with_bos_and_count_it(tokenizers):
    tok, with_bos, text = tokenizers
    bos = bos_id(with_bos)
    blocks = token_blocks(with_bos, text, "train", seq_len=32, n_blocks=3)
    assert blocks.shape == (3, 32) and (blocks[:, 0] == bos).all()
    assert torch.equal(blocks[:, 1:], token_blocks(tok, text, "train", seq_len=31, n_blocks=3))
    assert not (token_blocks(tok, text, "train", seq_len=32, n_blocks=3)[:, 0] == bos).any()
    stream = long_stream(with_bos, text, "train", 50)
    assert stream.numel() == 50 and stream[0] == bos
    assert torch.equal(stream[1:], long_stream(tok, text, "train", 49))


def test_passkey_prompts_start_with_bos(tokenizers):
    _, with_bos, text = tokenizers
    stream = long_stream(with_bos, text, "eval", 400)
    task = build_task(with_bos, stream, 128, 0.5, np.random.default_rng(0))
    lo, hi = task.needle
    assert task.ids.numel() == 128 and task.ids[0] == bos_id(with_bos)
    assert (task.ids[1:] != bos_id(with_bos)).all()  # no BOS inside the filler
    assert task.key in with_bos.decode(task.ids[lo:hi])
