"""Join the peer protocol's JSON rows (run_kvpress.py and protocol.py) into markdown tables.

NLL rows: press / allocation; columns: B (average context KV entries per head after compression at N); each
cell: mean NLL over the samples (and its PPL, exp of that mean). Then the cross-check: kvpress's
StreamingLLMPress against headkv's B_streaming_B at each B, sample by sample.

Passkey rows ("task": "passkey"): press / allocation at each B (and full attention); columns: prompt length;
each cell: accuracy % over that length's tasks (every depth and trial). Then the cross-checks: the answers of
StreamingLLMPress against B_streaming_B, task by task, and of the two full-attention rows.

Any Python runs it (stdlib only):

    python3 bench/peers/table.py results/peers/kvpress.jsonl results/peers/headkv.jsonl
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from args import Parser, fail


def rows(paths: list[Path]) -> list[dict]:
    """Every row of the result files (JSON lines of run_kvpress.py or protocol.py), or one error line."""
    out = []
    for p in paths:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read result file {p}: {getattr(e, 'strerror', None) or e}")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError):
                row = None
            if isinstance(row, dict) and "skipped" in row:
                need = ("method", "B", "skipped")
            else:
                need = PASSKEY_FIELDS if isinstance(row, dict) and row.get("task") == "passkey" else FIELDS
            if not isinstance(row, dict) or any(k not in row for k in need):
                fail(f"{p}, line {i}: not a peer result row (run_kvpress.py or protocol.py writes them)")
            out.append(row)
    if not out:
        fail("the result files hold no rows")
    return out


FIELDS = ("source", "method", "B", "sample", "nll", "kept_mean", "N", "M")
PASSKEY_FIELDS = ("source", "method", "B", "length", "depth", "key", "correct", "answer", "kept_mean")


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+")
    a = ap.parse_args(argv)
    data = rows(a.files)
    passkey = [r for r in data if r.get("task") == "passkey"]
    nll = [r for r in data if r.get("task") != "passkey"]
    if nll:
        nll_table(nll)
    if passkey:
        if nll:
            print()
        passkey_table(passkey)


def nll_table(data: list[dict]) -> None:
    cells: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_sample: dict[tuple[str, str, int, int], float] = {}
    skipped: dict[str, str] = {}
    kept: dict[tuple[str, str, int], float] = {}
    budgets: set[int] = set()
    n = m = samples = None
    for r in data:
        if "skipped" in r:
            skipped[r["method"]] = r["skipped"]
            continue
        key = (r["source"], r["method"])
        cells[key][r["B"]].append(r["nll"])
        per_sample[(r["source"], r["method"], r["B"], r["sample"])] = r["nll"]
        kept[(r["source"], r["method"], r["B"])] = r["kept_mean"]
        n, m = r["N"], r["M"]
        budgets.add(r["B"])
    cols = sorted(budgets)
    samples = max((len(v) for c in cells.values() for v in c.values()), default=0)
    print(f"N = {n} context tokens, M = {m} scored tokens, {samples} samples; cell: mean NLL (PPL); "
          "B = mean context KV entries per KV head after compression\n")
    print("| source | press / allocation | " + " | ".join(f"B = {b}" for b in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    order = sorted(cells, key=lambda k: (k[1] != "full", k[0], k[1]))
    for key in order:
        vals = []
        for b in cols:
            v = cells[key].get(b)
            if not v:
                vals.append("")
                continue
            mean = sum(v) / len(v)
            note = "" if abs(kept[(*key, b)] - b) < 1e-6 else f" [kept {kept[(*key, b)]:.2f}]"
            vals.append(f"{mean:.4f} ({math.exp(mean):.2f}){note}")
        print(f"| {key[0]} | {key[1]} | " + " | ".join(vals) + " |")
    for name, why in sorted(skipped.items()):
        print(f"| kvpress | {name} | skipped: {why} |" + " |" * (len(cols) - 1))
    print()
    for b in cols:
        if b == n:
            continue  # the full-attention column: checked below
        ours, theirs = ("headkv", f"B_streaming_{b}", b), ("kvpress", "StreamingLLMPress", b)
        pairs = [(per_sample[(*theirs, k)], per_sample[(*ours, k)]) for k in range(samples)
                 if (*theirs, k) in per_sample and (*ours, k) in per_sample]
        if not pairs:
            print(f"cross-check B = {b}: no StreamingLLMPress / B_streaming_{b} pair")
            continue
        diffs = [abs(x - y) for x, y in pairs]
        print(f"cross-check B = {b}: |NLL(kvpress StreamingLLMPress) - NLL(headkv B_streaming_{b})| "
              "per sample: "
              + ", ".join(f"{d:.2e}" for d in diffs) + f"; max {max(diffs):.2e}")
    kv, hk = ("kvpress", "full", n), ("headkv", "full", n)
    full = [(per_sample[(*kv, k)], per_sample[(*hk, k)]) for k in range(samples)
            if (*kv, k) in per_sample and (*hk, k) in per_sample]
    if full:
        print(f"cross-check full attention (transformers of each venv): max |NLL difference| "
              f"{max(abs(x - y) for x, y in full):.2e}")


def _task(r: dict) -> tuple:
    return (r["length"], r["depth"], r.get("trial"), r["key"])


def passkey_table(data: list[dict]) -> None:
    cells: dict[tuple, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    answers: dict[tuple, dict[tuple, str]] = defaultdict(dict)  # (source, method, B) -> task -> answer
    kept: dict[tuple, list[float]] = defaultdict(list)
    skipped: dict[str, str] = {}
    checks: dict[str, list[bool]] = defaultdict(list)
    for r in data:
        if "skipped" in r:
            skipped[r["method"]] = r["skipped"]
            continue
        key = (r["source"], r["method"], r["B"])
        cells[key][r["length"]].append(bool(r["correct"]))
        answers[key][_task(r)] = r["answer"]
        kept[key].append(r["kept_mean"])
        if "matches_one_forward" in r:
            checks[r["source"]].append(bool(r["matches_one_forward"]))
    lengths = sorted({length for c in cells.values() for length in c})
    depths = sorted({r["depth"] for r in data if "skipped" not in r})
    tasks = max((len(v) for c in cells.values() for v in c.values()), default=0)
    print(f"Passkey retrieval: {tasks} tasks per length (depths {', '.join(f'{d:g}' for d in depths)}); "
          "cell: accuracy % (correct / tasks); B = mean context KV entries per KV head after compression "
          "(full: the whole context)\n")
    print("| source | press / allocation | B | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    order = sorted(cells, key=lambda k: (k[2] is not None, k[2] or 0, k[1] != "full", k[0], k[1]))
    for key in order:
        vals = []
        for n in lengths:
            v = cells[key].get(n)
            vals.append(f"{100 * sum(v) / len(v):.1f} ({sum(v)}/{len(v)})" if v else "")
        b = "full" if key[2] is None else str(key[2])
        off = [x for x in kept[key] if key[2] is not None and abs(x - key[2]) > 1e-6]
        if off:
            b += f" [kept {min(off):.2f} .. {max(off):.2f}]"
        print(f"| {key[0]} | {key[1]} | {b} | " + " | ".join(vals) + " |")
    for name, why in sorted(skipped.items()):
        print(f"| kvpress | {name} | | skipped: {why} |" + " |" * (len(lengths) - 1))
    print()
    pairs = [(("kvpress", "StreamingLLMPress", b), ("headkv", f"B_streaming_{b}", b))
             for b in sorted({k[2] for k in cells if k[2] is not None})]
    pairs.append((("kvpress", "full", None), ("headkv", "full", None)))
    for theirs, ours in pairs:
        common = sorted(set(answers[theirs]) & set(answers[ours]))
        label = "full attention" if theirs[2] is None else f"B = {theirs[2]}"
        if not common:
            if theirs[2] is not None:
                print(f"cross-check {label}: no StreamingLLMPress / {ours[1]} pair")
            continue
        differ = [t for t in common if answers[theirs][t] != answers[ours][t]]
        print(f"cross-check {label}: kvpress {theirs[1]} and headkv {ours[1]} give the same answer on "
              f"{len(common) - len(differ)} of {len(common)} tasks"
              + "".join(f"; differ at length {t[0]} depth {t[1]:g} trial {t[2]}: "
                        f"{answers[theirs][t]!r} vs {answers[ours][t]!r}" for t in differ))
    for source, ok in sorted(checks.items()):
        what = ("the masked full-attention decode" if source == "headkv"
                else "the token-by-token full-attention decode")
        print(f"check {source}: {what} equals a plain one-forward + cached decode on {sum(ok)} of {len(ok)} "
              "tasks")


if __name__ == "__main__":
    main()
