"""Dynamic windows (models.dynamic): the masked evaluator == the evicting cache, exact bytes, the rule itself.

Every family the patch claims runs the same fill rule in the masked forward (every key of the sequence, the
evaluator) and in the evicting FilledCache (a prefill, multi-token pieces, then one token per step), in
float64 so that the content-dependent choice cannot flip on rounding; the cache's bytes are the
allocation's; heads whose window leaves no middle are exactly the static allocation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, tiny_model
from test_families import CONFIGS
from test_families import tiny as family_model

from headkv.alloc.allocation import Allocation, AllocationError, applied
from headkv.models.dynamic import Fill, FilledCache, FillError, _choose, meta_bytes, room
from headkv.models.loading import model_shape


def budgets(model, seed: int = 1, lo: int = 4, hi: int = 24) -> Allocation:
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    sink, window = torch.randint(0, 3, s.shape, generator=g), torch.randint(lo, hi, s.shape, generator=g)
    return Allocation.from_tensors(sink, window, model_id=s.model_id, q_per_kv=s.q_per_kv)


def masked(model, alloc, ids):
    with torch.no_grad(), applied(model, alloc):
        return model(ids).logits


def evicting(model, alloc, ids, prompt: int, pieces=()):
    out = []
    with torch.no_grad(), applied(model, alloc, evict=True) as cache:
        out.append(model(ids[:, :prompt], cache=cache, use_cache=True).logits)
        t = prompt
        for p in pieces:
            out.append(model(ids[:, t : t + p], cache=cache, use_cache=True).logits)
            t += p
        for i in range(t, ids.shape[1]):
            out.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1), cache


FILLS = [Fill(3, 4, 0.5), Fill(2, 1, 1.0), Fill(5, 8, 0.0)]


@pytest.mark.parametrize("arch", ["neox", "llama"])
@pytest.mark.parametrize("fill", FILLS, ids=lambda f: f.label())
@pytest.mark.parametrize("prompt,pieces", [(1, ()), (9, ()), (13, (5, 7))])
def test_masked_equals_evicting(arch, fill, prompt, pieces):
    model = tiny_model(arch).double()
    alloc = budgets(model).filled(fill)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(2))
    want = masked(model, alloc, ids)
    got, _ = evicting(model, alloc, ids, prompt, pieces)
    assert (got - want).abs().max() < 1e-10
    assert (want - masked(model, alloc.filled(None), ids)).abs().max() > 1e-3  # content changed the mask


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family(family):
    """Soft-capping (Gemma-2) and native sliding layers (Gemma-3, Mistral: static heads there) included."""
    model = family_model(family).double()
    alloc = budgets(model, hi=16).filled(Fill(2, 2, 0.5))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    got, _ = evicting(model, alloc, ids, 7, (4,))
    assert (got - masked(model, alloc, ids)).abs().max() < 1e-9


def test_no_middle_is_static():
    """Windows below recent + chunk leave no middle: every head keeps exactly its static window."""
    model = tiny_model("llama").double()
    alloc = budgets(model, lo=1, hi=8)
    fill = Fill(4, 5, 0.5)
    assert int(room(*alloc.tensors(), None, fill).max()) == 0
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    assert (masked(model, alloc.filled(fill), ids) - masked(model, alloc, ids)).abs().max() < 1e-12


def test_exact_bytes():
    """The cache never holds more than the static allocation; once a chunk ends with every middle full it
    holds exactly its K, V, score and position bytes (Allocation.kv_bytes)."""
    model = tiny_model("neox").double()
    fill = Fill(3, 4, 0.5)
    alloc = budgets(model, lo=8, hi=20).filled(fill)
    s = model_shape(model)
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), applied(model, alloc, evict=True) as cache:
        model(ids[:, :10], cache=cache, use_cache=True)
        for t in range(10, 64):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            bound = 2 * alloc.kv_bytes(t + 1, s.head_dim, torch.float64)
            assert cache.bytes_held() <= bound
        assert cache.bytes_held() == 2 * alloc.kv_bytes(64, s.head_dim, torch.float64)
        for layer, (sk, w) in zip(cache.layers, zip(*alloc.tensors(), strict=True), strict=True):
            assert layer.sizes == (sk + w).tolist()  # the segments are the budgets, nothing padded
    static = alloc.filled(None).kv_bytes(64, s.head_dim, torch.float64)
    assert alloc.kv_bytes(64, s.head_dim, torch.float64) == static + meta_bytes(alloc.kv_tokens(64))


def test_choose_ranks_by_score_then_age():
    score = torch.tensor([[[0.5, 0.9, 0.5, 0.1, 0.7]]])
    pos = torch.tensor([[[7, 3, 2, 5, 9]]])
    cand = torch.tensor([[[True, True, True, True, False]]])
    kept = _choose(score, pos, cand, torch.tensor([2]))
    assert kept.tolist() == [[[False, True, True, False, False]]]  # 0.9, then the older of the two 0.5


def test_file_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama")
    alloc = budgets(model).filled(Fill(4, 4, 0.25))
    path = alloc.save(tmp_path / "a.json")
    back = Allocation.load(path)
    assert back == alloc and back.fill == Fill(4, 4, 0.25) and back.digest() != alloc.filled(None).digest()
    for bad in ({"recent": 0}, {"decay": 2}, {"nope": 1}):
        d = alloc.to_dict()
        d["fill"] = {**d["fill"], **bad}
        with pytest.raises(AllocationError):
            Allocation.from_dict(d)
    with pytest.raises(AllocationError):
        with applied(model, alloc, evict=True, static=64):
            pass
    with pytest.raises(AllocationError):
        with applied(model, alloc, evict=True, reindex=True):
            pass
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(FillError), torch.no_grad(), applied(model, alloc, evict=True) as cache:
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    assert isinstance(cache, FilledCache)


def test_generate_greedy_and_beams():
    """transformers' generate through the filled cache: greedy equals the hand-written decode loop, and beam
    search (which reorders the cache) runs."""
    model = tiny_model("llama").double()
    alloc = budgets(model).filled(Fill(3, 4, 0.5))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), applied(model, alloc, evict=True) as cache:
        out = model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False)
    seq = ids
    for _ in range(12):
        nxt = masked(model, alloc, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    with torch.no_grad(), applied(model, alloc, evict=True) as cache:
        beams = model.generate(ids, cache=cache, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == (2, 26)


def test_fill_command(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    src = budgets(model).save(tmp_path / "a.json")
    out = tmp_path / "d.json"
    code, stdout, _ = run_cli(monkeypatch, capsys, "fill", str(src), "--recent", "4", "--chunk", "2",
                              "-o", str(out))
    assert code == 0 and "filled by content" in stdout
    assert Allocation.load(out).fill == Fill(4, 2, Fill().decay)
    code, _, err = run_cli(monkeypatch, capsys, "fill", str(src), "--decay", "1.5", "-o", str(tmp_path / "x"))
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_masked_equals_evicting_cuda(arch):
    """The same rule on a CUDA device (float64, so the choice cannot flip on rounding)."""
    model = tiny_model(arch).double().cuda()
    alloc = budgets(model).filled(Fill(3, 4, 0.5))
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2)).cuda()
    got, cache = evicting(model, alloc, ids, 9, (5,))
    assert (got - masked(model, alloc, ids)).abs().max() < 1e-10
    assert cache.bytes_held() == 2 * alloc.kv_bytes(50, model_shape(model).head_dim, torch.float64)


def test_query_blocks(monkeypatch):
    """The masked forward computes logits a block of queries at a time (ROWS): any block size gives the same
    result, in the evaluator and in a cache's multi-token forwards that start mid-chunk."""
    import headkv.models.dynamic as dynamic

    model = tiny_model("llama").double()
    alloc = budgets(model).filled(Fill(3, 4, 0.5))
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(8))
    want = masked(model, alloc, ids)
    monkeypatch.setattr(dynamic, "ROWS", 5)
    assert (masked(model, alloc, ids) - want).abs().max() < 1e-12
    got, _ = evicting(model, alloc, ids, 13, (6, 11, 7))
    assert (got - want).abs().max() < 1e-10
