"""An allocation's windows scaled to another budget (same sinks, same shape of windows across heads), for a
coverage point that has no allocation trained at its budget:

    python bench/scaled.py runs/learned_b64/allocation.json --budget 16 --out runs/scaled_b16/allocation.json

Each window becomes ``max(1, round(window * f))`` with ``f`` chosen so that the mean of sink + window is the
budget (the rounding remainder goes to the first heads), and the name says where it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_memory import Parser, fail  # noqa: E402

from headkv.alloc.allocation import Allocation  # noqa: E402
from headkv.models.common import HeadkvError  # noqa: E402


def scaled(alloc: Allocation, budget: float) -> Allocation:
    sink, window = alloc.tensors()
    target = round(budget * sink.numel()) - int(sink.sum())  # the windows' total
    if target < window.numel():
        raise HeadkvError(f"budget {budget} leaves less than one window key per head")
    w = (window.double() * target / float(window.sum())).round().long().clamp(min=1)
    flat, diff, i = w.view(-1), target - int(w.sum()), 0
    step = 1 if diff > 0 else -1
    while diff:  # the rounding remainder, one key per head (never a window below 1)
        if step > 0 or flat[i] > 1:
            flat[i] += step
            diff -= step
        i = (i + 1) % flat.numel()
    name = f"{alloc.name}_scaled_b{budget:g}"
    return Allocation.from_tensors(sink, w, model_id=alloc.model_id, q_per_kv=alloc.q_per_kv,
                                   meta={**alloc.meta, "policy": name, "budget": budget,
                                         "scaled_from": alloc.name})


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("allocation", type=Path)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not 0 < a.budget < float("inf"):
        fail(f"--budget must be a positive number, got {a.budget}")
    if a.out.exists() and not a.out.is_file():
        fail(f"--out {a.out} exists and is not a regular file")
    try:
        out = scaled(Allocation.load(a.allocation), a.budget)
    except HeadkvError as e:
        fail(str(e))
    out.save(a.out)
    print(f"{out.name}: Eff.Ctx {out.eff_ctx():.3f}; wrote {a.out}")


if __name__ == "__main__":
    main()
