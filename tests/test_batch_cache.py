"""Padded batches and beam search through the per-head evicting cache (measured in docs/results.md,
section 'Generation speed and memory').

Each sequence of a left-padded batch has its own positions (its index among its own real tokens, as
``generate`` derives ``position_ids`` from the attention mask), so its sinks are its own first tokens, its
window its own last ones, and padding is never held: every prompt of a batch gets what it gets alone.
"""

from __future__ import annotations

import pytest
import torch

from headkv.alloc.allocation import Allocation, applied
from headkv.alloc.passkey import greedy
from headkv.models import window as win
from headkv.models.attention import is_clean
from headkv.models.kv_cache import PerHeadCache
from headkv.models.loading import model_shape
from tests.conftest import VOCAB
from tests.test_kv_cache import random_alloc

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

PAD = 0


def left_pad(prompts: list[torch.Tensor], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, T) and attention mask (B, T); ``extra`` more padding columns for every row."""
    n = max(len(p) for p in prompts) + extra
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :], mask[i, n - len(p) :] = p, 1
    return ids, mask


def prompts_around(alloc: Allocation, seed: int) -> list[torch.Tensor]:
    """Three prompts: one shorter than the largest sink + window (heads still filling), one in between, one
    longer than every head's sink + window (every head evicting)."""
    sink, window = alloc.tensors()
    cap = int((sink + window).max())
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (3, cap - 2, 2 * cap + 5)]


def predicted_bytes(alloc: Allocation, counts: list[int], model) -> int:
    """Sum over sequences of the allocation's bytes after that sequence's own real tokens."""
    s = model_shape(model)
    return sum(alloc.kv_bytes(n, s.head_dim, model.dtype) for n in counts)


def held_positions(cache: PerHeadCache, layer: int, batch: int) -> torch.Tensor:
    """Positions (B, Hkv, K) held by one layer, -1 for an empty slot."""
    pos = cache.layers[layer].padded_pos()
    return pos.expand(batch, *pos.shape) if pos.dim() == 2 else pos


def check_held(cache: PerHeadCache, alloc: Allocation, counts: list[int]) -> None:
    """Every sequence holds, in every head, exactly the keys its next query may see: positions among its own
    real tokens (so never padding), its sinks its first real tokens, its window its last ones."""
    sink, window = alloc.tensors()
    for li in range(len(cache.layers)):
        pos = held_positions(cache, li, len(counts))
        for b, n in enumerate(counts):
            ok = win.allowed(torch.tensor([n - 1]), torch.arange(n), sink[li], window[li])[:, 0]  # (Hkv, n)
            for h in range(pos.shape[1]):
                held = sorted(p for p in pos[b, h].tolist() if p >= 0)
                assert held == ok[h].nonzero().flatten().tolist(), (li, b, h, n)


def keys_by_position(cache: PerHeadCache, layer: int, b: int, h: int) -> dict[int, torch.Tensor]:
    keys = cache.layers[layer].padded_kv()[0][b, h]  # (K, D)
    pos = held_positions(cache, layer, cache.layers[layer].keys.shape[0])[b, h]
    return {p: keys[j] for j, p in enumerate(pos.tolist()) if p >= 0}


def decode_loop(model, alloc, ids, mask, new_tokens, chunk, check=None):
    """A hand-written greedy loop: chunked prefill, then one token per step, with the attention mask and
    the position ids ``generate`` would pass. ``mask=None``: one unpadded prompt. Returns (new ids, cache)."""
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with applied(model, alloc, evict=True) as cache, torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            kw = {}
            if mask is not None:
                kw = {"attention_mask": mask[:, : lo + chunk], "position_ids": pos[:, lo : lo + chunk]}
            logits = model(ids[:, lo : lo + chunk], cache=cache, **kw).logits
            if check:
                check(cache, mask[:, : lo + chunk].sum(1).tolist())
        out = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if mask is not None:
                mask, pos = torch.cat([mask, torch.ones_like(nxt)], 1), pos[:, -1:] + 1
                kw = {"attention_mask": mask, "position_ids": pos}
            logits = model(nxt, cache=cache, **kw).logits
            if check:
                check(cache, mask.sum(1).tolist())
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("reindex", [False, True])
def test_batched_generate_equals_each_prompt_alone(tiny, reindex):
    alloc = random_alloc(tiny, seed=21)
    prompts = prompts_around(alloc, seed=22)
    ids, mask = left_pad(prompts)
    n = 12
    with applied(tiny, alloc, evict=True, reindex=reindex) as cache:
        out = tiny.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=PAD)
    for i, p in enumerate(prompts):
        with applied(tiny, alloc, evict=True, reindex=reindex) as alone:
            ref = tiny.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), cache=alone,
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD)
        assert torch.equal(out[i, ids.shape[1] :], ref[0, len(p) :]), i
    counts = [len(p) + n - 1 for p in prompts]  # the last new token is never fed back
    assert cache.bytes_held() == predicted_bytes(alloc, counts, tiny)
    check_held(cache, alloc, counts)
    assert is_clean(tiny)


def test_masked_forward_over_a_padded_batch_equals_each_prompt_alone(tiny):
    """The masked evaluator (full cache) gives padded sequences their own positions too: the reference."""
    alloc = random_alloc(tiny, seed=23)
    prompts = prompts_around(alloc, seed=24)
    ids, mask = left_pad(prompts, extra=2)
    with applied(tiny, alloc), torch.no_grad():
        out = tiny(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        for i, p in enumerate(prompts):
            ref = tiny(p[None]).logits[0]
            assert (out[i, ids.shape[1] - len(p) :] - ref).abs().max() <= 1e-4, i
    assert is_clean(tiny)


@pytest.mark.parametrize("chunk", [1, 7])
def test_decode_loop_holds_each_sequences_own_keys_and_bytes(tiny, chunk):
    alloc = random_alloc(tiny, seed=25)
    prompts = prompts_around(alloc, seed=26)
    ids, mask = left_pad(prompts, extra=2)  # two columns of padding for every row: the batch starts empty
    n = 10
    seen_holes = []

    def check(cache: PerHeadCache, counts: list[int]) -> None:
        assert cache.bytes_held() == predicted_bytes(alloc, counts, tiny)
        assert cache.bytes_allocated() >= cache.bytes_held()
        seen_holes.append(cache.bytes_allocated() > cache.bytes_held())
        check_held(cache, alloc, counts)

    out, cache = decode_loop(tiny, alloc, ids, mask, n, chunk, check)
    assert any(seen_holes)  # the short prompt left slots of the rectangular storage empty for a while
    # once every sequence holds its sink + window, what is allocated is what is held
    assert cache.bytes_allocated() == cache.bytes_held()
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], greedy(tiny, alloc, p[None], n, prefill_chunk=chunk)[0]), i
        alone_out, alone = decode_loop(tiny, alloc, p[None], None, n, chunk)
        assert torch.equal(alone_out[0], out[i])
        for li in range(len(cache.layers)):  # the very keys a prompt holds alone: never a padding token's
            for h in range(len(cache.layers[li].lengths)):
                mine, ref = keys_by_position(cache, li, i, h), keys_by_position(alone, li, 0, h)
                assert mine.keys() == ref.keys()
                assert all((mine[p] - ref[p]).abs().max() <= 1e-4 for p in ref), (i, li, h)
    assert is_clean(tiny)


def test_reorder_moves_each_sequences_positions_with_it(tiny):
    """reorder_cache on a padded batch of different lengths: rows swap keys, positions and counts alike."""
    alloc = random_alloc(tiny, seed=27)
    prompts = prompts_around(alloc, seed=28)[:2]
    follow = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(29))

    def run(order: list[int], swap: bool) -> torch.Tensor:
        ids, mask = left_pad([prompts[i] for i in order])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = []
        with applied(tiny, alloc, evict=True) as cache, torch.no_grad():
            tiny(ids, attention_mask=mask, position_ids=pos, cache=cache)
            if swap:
                cache.reorder_cache(torch.tensor([1, 0]))
                mask, pos = mask.flip(0), pos.flip(0)
            for j in range(follow.shape[1]):
                mask, pos = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), pos[:, -1:] + 1
                step = tiny(follow[:, j : j + 1], attention_mask=mask, position_ids=pos, cache=cache)
                logits.append(step.logits)
        return torch.cat(logits, 1)

    assert (run([0, 1], swap=True) - run([1, 0], swap=False)).abs().max() <= 1e-4
    assert (run([0, 1], swap=False) - run([1, 0], swap=False)).abs().max() > 1e-3  # the swap mattered


def test_repeat_interleave_and_select_carry_positions(tiny):
    """The batch reshapes transformers applies to a filled cache keep each row's positions and count."""
    alloc = random_alloc(tiny, seed=29)
    prompts = prompts_around(alloc, seed=30)[:2]
    follow = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(30))

    def run(rows: list[int], reshape) -> torch.Tensor:
        ids, mask = left_pad([prompts[i] for i in rows])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with applied(tiny, alloc, evict=True) as cache, torch.no_grad():
            tiny(ids, attention_mask=mask, position_ids=pos, cache=cache)
            if reshape:
                index = reshape(cache)
                mask, pos = mask[index], pos[index]
            logits = []
            for j in range(follow.shape[1]):
                mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1
                x = follow[: len(mask), j : j + 1]
                logits.append(tiny(x, attention_mask=mask, position_ids=pos, cache=cache).logits)
        return torch.cat(logits, 1)

    def repeat(cache):
        cache.batch_repeat_interleave(2)
        return torch.tensor([0, 0, 1, 1])

    def select(cache):
        cache.batch_select_indices(torch.tensor([1]))
        return torch.tensor([1])

    assert (run([0, 1], repeat) - run([0, 0, 1, 1], None)).abs().max() <= 1e-4
    assert (run([0, 1], select) - run([1], None)).abs().max() <= 1e-4


def test_batched_window_rule_is_each_sequences_rule():
    """allowed / keep with batched positions, and positions of a padded mask, per sequence."""
    sink, window = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 6])
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1, 1, 1], [1] * 8]).bool()
    start = torch.tensor([0, 3, 5])
    p = win.positions(real, start)
    assert p.tolist() == [[-1, -1, 0, 1, 2, 3, 4, 5], [-1, 3, -1, 4, 5, 6, 7, 8], list(range(5, 13))]
    both = win.allowed(p, p, sink, window)  # (B, H, Q, K)
    kept = win.keep(p, start + real.sum(1), sink, window)  # (B, H, P)
    for b in range(3):
        assert torch.equal(both[b], win.allowed(p[b], p[b], sink, window))
        assert not both[b][:, ~real[b]].any() and not both[b][:, :, ~real[b]].any()  # padding: nothing
        assert torch.equal(kept[b], win.keep(p[b], int(start[b] + real[b].sum()), sink, window))
        assert not kept[b][:, ~real[b]].any()


@pytest.mark.parametrize("batch", [1, 2])
def test_beam_search_equals_masked_recompute(tiny, batch):
    alloc = random_alloc(tiny, seed=31)
    prompts = prompts_around(alloc, seed=32)[1:] if batch == 2 else prompts_around(alloc, seed=32)[2:]
    ids, mask = left_pad(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=2,
              pad_token_id=PAD)
    with applied(tiny, alloc):  # masked, over transformers' own cache
        ref = tiny.generate(ids, **kw)
    with applied(tiny, alloc, evict=True) as cache:
        out = tiny.generate(ids, cache=cache, **kw)
    assert out.shape == (2 * batch, ids.shape[1] + 10)
    assert torch.equal(out, ref)
    assert is_clean(tiny)


def test_passkey_greedy_over_a_padded_batch(tiny):
    alloc = random_alloc(tiny, seed=33)
    prompts = prompts_around(alloc, seed=34)
    ids, mask = left_pad(prompts)
    out = greedy(tiny, alloc, ids, 8, prefill_chunk=5, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], greedy(tiny, alloc, p[None], 8, prefill_chunk=5)[0]), i


def test_offline_default_batched_generate_equals_each_prompt_alone(smollm):
    model, tok = smollm
    s = model_shape(model)
    g = torch.Generator().manual_seed(35)
    alloc = Allocation.from_tensors(torch.full(s.shape, 4), torch.randint(4, 24, s.shape, generator=g),
                                    model_id=s.model_id, q_per_kv=s.q_per_kv)
    texts = [
        "Emma Woodhouse, handsome,",
        "The family of Dashwood had long been settled in Sussex.",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be",
    ]
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    cap = alloc.tensors()[0] + alloc.tensors()[1]  # sink + window per head
    assert len(prompts[0]) < int(cap.min()) and len(prompts[-1]) > int(cap.max())  # filling, and evicting
    ids, mask = left_pad(prompts)
    n = 8
    with applied(model, alloc, evict=True) as cache:
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=PAD)
    assert cache.bytes_held() == predicted_bytes(alloc, [len(p) + n - 1 for p in prompts], model)
    for i, p in enumerate(prompts):
        with applied(model, alloc, evict=True) as alone:
            ref = model.generate(p[None], cache=alone, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=PAD)
        assert torch.equal(out[i, ids.shape[1] :], ref[0, len(p) :]), i
