"""Quantizing an allocation to at most K (sink, window) classes: the budget holds, the classes are few,
contiguous under the recorded permutation and least-loss, the file is an ordinary allocation, and
`headkv quantize`."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from headkv.alloc.allocation import Allocation, AllocationError
from headkv.alloc.quantize import _segments, quantize


def _random(seed: int, shape: tuple[int, int] = (6, 4), sinks: tuple[int, ...] = (4,)) -> Allocation:
    g = torch.Generator().manual_seed(seed)
    window = torch.exp(torch.empty(shape).uniform_(0, math.log(1024), generator=g)).long().clamp_min(1)
    sink = torch.tensor(sinks)[torch.randint(0, len(sinks), shape, generator=g)]
    return Allocation.from_tensors(sink, window, model_id="m", q_per_kv=3, meta={"policy": f"rand{seed}"})


def _pairs(a: Allocation) -> set[tuple[int, int]]:
    return {(s, w) for rs, rw in zip(a.sink, a.window, strict=True) for s, w in zip(rs, rw, strict=True)}


def _total(a: Allocation) -> int:
    return sum(s + w for rs, rw in zip(a.sink, a.window, strict=True) for s, w in zip(rs, rw, strict=True))


CASES = [(seed, k, sinks) for seed in range(6) for k in (1, 2, 3, 4) for sinks in ((4,), (0, 4))]


@pytest.mark.parametrize("seed,k,sinks", CASES)
def test_budget_holds_and_at_most_k_classes(seed, k, sinks):
    a = _random(seed, sinks=sinks)
    q = quantize(a, k)
    n = a.shape[0] * a.shape[1]
    assert q.shape == a.shape and q.model_id == "m" and q.q_per_kv == 3
    assert q.eff_ctx() <= a.eff_ctx() + 1e-12
    assert a.eff_ctx() - q.eff_ctx() < 1  # short only by integer rounding: (total deficit) / heads
    assert 0 <= _total(a) - _total(q) < n
    assert len(_pairs(q)) <= k and len(q.meta["classes"]) == len(_pairs(q))
    assert all(w >= 1 for row in q.window for w in row)
    assert q.meta["policy"] == f"rand{seed}_k{k}"
    assert q.meta["quantized_from"] == {"policy": f"rand{seed}", "digest": a.digest(), "eff_ctx": a.eff_ctx()}


@pytest.mark.parametrize("seed", range(4))
def test_rounding_keeps_the_largest_total_the_class_sizes_allow(seed):
    a = _random(seed, shape=(4, 3))
    for k in (2, 3, 4):
        q = quantize(a, k)
        sizes = [sum(row.count(c) for row in q.meta["class_of"]) for c in range(len(q.meta["classes"]))]
        ctx = {(li, h): a.sink[li][h] + a.window[li][h] for li in range(4) for h in range(3)}
        means = [
            sum(v for (li, h), v in ctx.items() if q.meta["class_of"][li][h] == c) / n
            for c, n in enumerate(sizes)
        ]
        # the best floor/ceiling choice per class, by brute force
        best = max(
            held
            for combo in itertools.product(*[(math.floor(m), math.ceil(m)) for m in means])
            if (held := sum(n * c for n, c in zip(sizes, combo, strict=True))) <= _total(a)
        )
        assert _total(q) == best


def test_k1_is_uniform_with_the_same_eff_ctx_streaming_when_sinks_are_4():
    window = torch.tensor([[10, 50, 200], [30, 70, 40]])  # sum 400, mean window 66.67
    a = Allocation.from_tensors(torch.full((2, 3), 4), window, meta={"policy": "learned_b70"})
    q = quantize(a, 1)
    assert _pairs(q) == {(4, 66)} and q.meta["classes"] == [[4, 66]]
    assert q == Allocation.uniform((2, 3), 4, 66)
    assert a.eff_ctx() - 1 / 6 * 4 == pytest.approx(q.eff_ctx())  # floor: 4 heads' worth of 1/6 short

    window = torch.tensor([[10, 50, 200], [32, 70, 40]])  # sum 402 = 6 x 67: exact
    q = quantize(Allocation.from_tensors(torch.full((2, 3), 4), window), 1)
    assert q == Allocation.uniform((2, 3), 4, 67) and q.eff_ctx() == 71


def test_already_k_classes_comes_back_unchanged_and_quantizing_is_idempotent():
    two = Allocation(((4, 4, 0), (0, 4, 4)), ((60, 60, 200), (200, 60, 60)), "m", 1, {"policy": "two"})
    for k in (2, 3, 4):
        q = quantize(two, k)
        assert q == two and q.meta["classes"] == [[4, 60], [0, 200]]
        assert q.meta["class_of"] == [[0, 0, 1], [1, 0, 0]]
        assert q.meta["permutation"] == [[0, 1, 2], [1, 2, 0]]
    for seed, k in itertools.product(range(3), (1, 2, 3, 4)):
        q = quantize(_random(seed, sinks=(0, 4)), k)
        again = quantize(q, k)
        assert again == q and again.meta["classes"] == q.meta["classes"]
        assert again.meta["class_of"] == q.meta["class_of"]


@pytest.mark.parametrize("seed,k", [(s, k) for s in range(4) for k in (2, 3, 4)])
def test_permutation_makes_each_layers_classes_contiguous(seed, k):
    q = quantize(_random(seed, sinks=(0, 4)), k)
    n_layers, n_heads = q.shape
    classes, class_of, perm = q.meta["classes"], q.meta["class_of"], q.meta["permutation"]
    assert len(perm) == n_layers and len(class_of) == n_layers
    ctx = [s + w for s, w in classes]
    assert ctx == sorted(ctx) and len(set(ctx)) == len(ctx)  # increasing context, distinct
    for li in range(n_layers):
        assert sorted(perm[li]) == list(range(n_heads))
        ordered = [class_of[li][h] for h in perm[li]]
        assert ordered == sorted(ordered)  # contiguous classes, in class order
        for h in range(n_heads):
            assert [q.sink[li][h], q.window[li][h]] == classes[class_of[li][h]]


def test_more_context_never_lands_in_a_smaller_class():
    a = _random(7, shape=(8, 4), sinks=(0, 4))
    q = quantize(a, 3)
    heads = [(li, h) for li in range(8) for h in range(4)]
    old = {x: a.sink[x[0]][x[1]] + a.window[x[0]][x[1]] for x in heads}
    new = {x: q.sink[x[0]][x[1]] + q.window[x[0]][x[1]] for x in heads}
    for x, y in itertools.product(heads, heads):
        if old[x] < old[y]:
            assert new[x] <= new[y]


def test_two_clear_clusters_are_recovered():
    window = [[16, 500, 18, 20], [510, 17, 520, 505], [19, 515, 16, 490]]
    a = Allocation(((4,) * 4,) * 3, tuple(map(tuple, window)), meta={"policy": "two_groups"})
    q = quantize(a, 2)
    big = [[w > 100 for w in row] for row in window]
    assert q.meta["class_of"] == [[int(b) for b in row] for row in big]
    # contexts 21.67 and 510.67 (x 6 heads each, total 3194): 22 + 510 and 21 + 511 both give 3192, the most
    # that fits; rounding the small class up loses less in log ratio
    assert q.meta["classes"] == [[4, 18], [4, 506]]
    assert a.eff_ctx() - q.eff_ctx() == pytest.approx(2 / 12)
    assert q.meta["permutation"][0] == [0, 2, 3, 1]


def _loss(values, counts, bounds):
    out = 0.0
    for i, j in bounds:
        vs = [v for v, c in zip(values[i:j], counts[i:j], strict=True) for _ in range(c)]
        mean = sum(vs) / len(vs)
        out += sum(math.log(mean / v) ** 2 for v in vs)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_dynamic_program_finds_the_least_loss_split(seed):
    g = torch.Generator().manual_seed(seed)
    values = sorted(set(torch.randint(1, 300, (8,), generator=g).tolist()))
    counts = torch.randint(1, 5, (len(values),), generator=g).tolist()
    m = len(values)
    for k in (1, 2, 3, 4):
        got = _loss(values, counts, _segments(torch.tensor(values).numpy(), torch.tensor(counts).numpy(), k))
        brute = min(
            _loss(values, counts, list(zip((0, *cuts), (*cuts, m), strict=True)))
            for n_cuts in range(k)
            for cuts in itertools.combinations(range(1, m), n_cuts)
        )
        assert got == pytest.approx(brute, abs=1e-9)


def test_mixed_sinks_in_a_class_round_their_mean_and_keep_windows_positive():
    a = Allocation(((0, 4, 4), (0, 1, 0)), ((64, 60, 61), (1, 1, 2)), meta={"policy": "mixed"})
    q = quantize(a, 2)
    # contexts 1, 2, 2 (mean 1.67) -> 2, sinks 0, 1, 0 -> 0; contexts 64, 64, 65 (mean 64.33) -> 64, sinks
    # 0, 4, 4 -> 3 (2 and 64 fill the total exactly, as 1 and 65 would, with less log loss)
    assert q.meta["classes"] == [[0, 2], [3, 61]] and q.eff_ctx() == pytest.approx(a.eff_ctx())
    # contexts 2, 3, 3 (mean 2.67) -> 2 (3 would overshoot the total) with sinks 1, 2, 2 -> 2, capped at 1 so
    # the window stays 1
    b = Allocation(((1, 2, 2, 9),), ((1, 1, 1, 100),), meta={"policy": "capped"})
    assert quantize(b, 2).meta["classes"] == [[1, 1], [9, 100]]


@pytest.mark.parametrize("k,words", [(0, "from 1 to 4"), (5, "from 1 to 4"), (3, "only 2 heads")])
def test_bad_class_counts_are_one_line_errors(k, words):
    a = Allocation(((4, 4),), ((10, 20),), meta={"policy": "small"})
    with pytest.raises(AllocationError, match=words) as e:
        quantize(a, k)
    assert "\n" not in str(e.value)
    for bad in (True, 2.0, "2"):
        with pytest.raises(AllocationError, match="integer"):
            quantize(a, bad)  # type: ignore[arg-type]


def test_the_file_loads_back_as_an_ordinary_allocation(tmp_path):
    q = quantize(_random(3, sinks=(0, 4)), 3)
    b = Allocation.load(q.save(tmp_path / "q.json"))
    assert b == q and b.meta == json.loads(json.dumps(q.meta)) and b.name == "rand3_k3"


def test_a_quantized_allocation_evaluates_on_a_tiny_model():
    from headkv.alloc.evaluate import evaluate
    from headkv.models.loading import model_shape
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    shape = model_shape(model)
    source = Allocation(
        ((4, 4), (4, 0)), ((4, 40), (12, 30)), shape.model_id, shape.q_per_kv, {"policy": "src"}
    )
    assert source.shape == shape.shape
    blocks = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    q2 = quantize(source, 2)
    r = evaluate(model, q2, blocks)
    assert math.isfinite(r.ppl) and r.name == "src_k2" and r.eff_ctx == q2.eff_ctx() <= source.eff_ctx()
    q1 = quantize(source, 1)
    assert q1.meta["classes"] == [[3, 21]]  # contexts 8, 44, 16, 30: mean 24.5 -> 24, sinks 4, 4, 4, 0 -> 3
    uniform = Allocation.uniform(shape.shape, 3, 21, model_id=shape.model_id, q_per_kv=shape.q_per_kv)
    assert q1 == uniform
    assert evaluate(model, q1, blocks).ppl == pytest.approx(evaluate(model, uniform, blocks).ppl)


# ---- the command: `headkv quantize ALLOCATION --classes K -o OUT` ------------------------------------------
def _source_file(tmp_path):
    a = _random(5, sinks=(0, 4))
    return a, str(a.save(tmp_path / "src.json"))


def test_cli_quantize_writes_the_library_result(tmp_path):
    from tests.test_passkey import cli_run

    a, path = _source_file(tmp_path)
    out = tmp_path / "sub" / "q.json"
    r = cli_run("quantize", path, "--classes", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    q = Allocation.load(out)
    assert q == quantize(a, 2) and q.meta["policy"] == "rand5_k2" and len(_pairs(q)) <= 2
    assert len(r.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,words",
    [
        (["--classes", "5"], "classes"),
        (["--classes", "0"], "classes"),
        ([], "--out"),  # no -o
    ],
)
def test_cli_quantize_bad_input_is_one_error_line_and_nothing_written(tmp_path, args, words):
    from tests.test_passkey import cli_run

    _, path = _source_file(tmp_path)
    out = tmp_path / "q.json"
    full = ["quantize", path, *args] + (["-o", str(out)] if words != "--out" else [])
    r = cli_run(*full)
    assert r.returncode == 2 and "No such command" not in r.stderr
    assert r.stderr.startswith("error:") and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_quantize_missing_allocation_file_is_one_error_line(tmp_path):
    from tests.test_passkey import cli_run

    out = tmp_path / "q.json"
    r = cli_run("quantize", str(tmp_path / "nope.json"), "--classes", "2", "-o", str(out))
    assert r.returncode == 2 and "No such command" not in r.stderr and "nope.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
