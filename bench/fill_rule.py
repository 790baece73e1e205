"""How the fill rule was chosen, and the compensation slots it does not keep, in one run, one JSON.

    python bench/fill_rule.py runs/learned_b64/allocation.json --out results/fill_rule.json

On the Austen TRAIN split (the split the learned allocation was trained on; the eval split is never read):
``grid``: the allocation static and filled under each (recent, chunk, decay) of ``--grid``, on ``--blocks``
x 1024 tokens; ``compensation``: on ``--comp-blocks`` x 1024 tokens, static and filled (the default rule)
with and without one slot of every head's budget spent on the mean of the keys and values the head no longer
sees (RazorAttention's compensation token for a frozen model), its logit + log(count) or not.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_memory import Parser, fail  # noqa: E402

import headkv.models.dynamic as dy  # noqa: E402
from headkv.alloc.allocation import Allocation  # noqa: E402
from headkv.alloc.evaluate import blocks_for, evaluate  # noqa: E402
from headkv.models import window as win  # noqa: E402
from headkv.models.common import HeadkvError, emit_json  # noqa: E402
from headkv.models.loading import load_model  # noqa: E402

GRID = ["4,8,0.5", "8,8,0.5", "4,4,0.5", "4,16,0.5", "8,16,0.5", "8,8,0.25", "8,8,0.75", "16,16,0.5",
        "16,16,0", "16,16,0.9", "32,16,0.5", "16,32,0.5"]


def compensated(log_count: bool):
    """dynamic.attend with one budget slot per head spent on the mean of the keys it no longer sees."""

    def attend(query, key, value, pos, held, score, rank, t0, sink, window, cap, fill, scaling, softcap=None):
        if t0 != 0 or key.shape[2] != query.shape[2]:
            raise HeadkvError("the compensation measurement runs the masked evaluator only")
        window = (window - 1).clamp(min=1)  # the summary takes one slot of the budget
        b, n_q, t, _ = query.shape
        n_kv = key.shape[1]
        r = n_q // n_kv
        m = dy.room(sink, window, cap, fill)
        dyn = (m > 0).view(1, -1, 1, 1)
        held, score, rank = held.clone(), score.clone(), rank.clone()
        out = query.new_empty(b, n_kv, r, t, value.shape[-1])
        q_all = torch.arange(t, device=query.device)
        limit = dy._limit(q_all.view(1, -1), m.view(-1, 1), fill).unsqueeze(-1)
        logits_all = dy._scores(query, key, scaling, softcap).float()
        static_all = win.allowed(q_all, pos, sink, window, cap)
        a = 0
        while a < t:
            if a % fill.chunk == 0 and a > 0:
                held, score, rank = dy._chunk_start(a, pos, held, score, rank, sink, m, fill)
            e = min(t, (a // fill.chunk + 1) * fill.chunk)
            held[..., a:e] = True
            kp, rk = pos[..., :e].unsqueeze(-2), rank[..., :e].unsqueeze(-2)
            causal = kp <= q_all[a:e].view(-1, 1)
            seen = torch.where(dyn, held[..., :e].unsqueeze(-2) & causal & (rk < limit[:, a:e]),
                               static_all[..., a:e, :e])
            gone = (causal & ~seen).to(key.dtype)  # (B, Hkv, Q', K'): keys the head no longer sees
            n = gone.sum(-1, keepdim=True)
            mk, mv = (gone @ key[..., :e, :]) / n.clamp(min=1), (gone @ value[..., :e, :]) / n.clamp(min=1)
            q = query[:, :, a:e].view(b, n_kv, r, e - a, -1)
            extra = (q * mk.unsqueeze(2)).sum(-1, keepdim=True).float() * scaling
            bias = n.clamp(min=1).log() if log_count else torch.zeros_like(n)
            extra = extra + torch.where(n > 0, bias, -math.inf).unsqueeze(2).float()
            lg = torch.cat([logits_all[..., a:e, :e].masked_fill(~seen.unsqueeze(2), -math.inf), extra], -1)
            probs = lg.softmax(-1)
            o = torch.matmul(probs[..., :-1].to(value.dtype), value[..., :e, :].unsqueeze(2))
            out[..., a:e, :] = o + probs[..., -1:].to(value.dtype) * mv.unsqueeze(2)
            score[..., :e] += probs[..., :-1].sum(dim=(2, 3)) / r
            a = e
        return out.view(b, n_q, t, -1).transpose(1, 2).contiguous(), held, score, rank

    return attend


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("allocation", type=Path)
    p.add_argument("--grid", nargs="*", default=GRID, help="recent,chunk,decay triples")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--comp-blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if min(a.blocks, a.comp_blocks, a.threads) < 1:
        fail("--blocks, --comp-blocks and --threads must be >= 1")
    if a.out and Path(a.out).exists() and not Path(a.out).is_file():
        fail(f"--out {a.out} exists and is not a regular file")
    try:
        alloc = Allocation.load(a.allocation)
        fills = [dy.Fill(int(r), int(c), float(d)) for r, c, d in (g.split(",") for g in a.grid)]
    except (HeadkvError, ValueError) as e:
        fail(f"{e}")
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m")
    result = {"bench": "fill_rule", "allocation": alloc.name, "split": "train", "grid": [],
              "compensation": []}
    blocks = blocks_for(tok, "austen", "train", 1024 * a.blocks, 1024)
    result["static_ppl"] = evaluate(model, alloc, blocks).ppl
    print(f"static: PPL {result['static_ppl']:.3f}", flush=True)
    for f in fills:
        r = evaluate(model, alloc.filled(f), blocks)
        result["grid"].append({**f.to_dict(), "ppl": r.ppl, "wall_s": r.wall_s})
        print(f"{f.label()}: PPL {r.ppl:.3f}", flush=True)
    blocks = blocks_for(tok, "austen", "train", 1024 * a.comp_blocks, 1024)
    original = dy.attend
    everything_static = dy.Fill(10**9, 1, 0.0)  # no head has a middle: the static windows, same code path
    for kind, fill in (("static", everything_static), ("dynamic", dy.Fill())):
        row = {"kind": kind, "without": evaluate(model, alloc.filled(fill), blocks).ppl}
        for label, log_count in (("with_log_count", True), ("with", False)):
            dy.attend = compensated(log_count)
            try:
                row[label] = evaluate(model, alloc.filled(fill), blocks).ppl
            finally:
                dy.attend = original
        result["compensation"].append(row)
        print(f"compensation, {kind}: {row}", flush=True)
    emit_json(result, a.out)


if __name__ == "__main__":
    main()
