"""The benches' own options: bad values end with one ``error:`` line and exit 2 before anything is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest


def _bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kv_memory():
    return _bench("kv_memory")


@pytest.mark.parametrize(
    "argv", [["--varied-budget", "4"], ["--long-heads", "-1"], ["--long-window", "0"]]
)
def test_bad_varied_options_are_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _kv_memory().parse(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --varied-budget must exceed")


def test_long_heads_beyond_the_budget_are_one_error_line(capsys):
    km = _kv_memory()
    shape = SimpleNamespace(n_layers=2, n_kv_heads=3, shape=(2, 3), model_id="m", q_per_kv=1)
    ok = km._spread(shape, 16, [0], 30, "retrieval-heads")  # 6 x 12 windows: 30 + 5 x 8.4
    assert ok.eff_ctx() == pytest.approx(16) and ok.window[0][0] == 30
    with pytest.raises(SystemExit) as e:
        km._spread(shape, 16, [0, 1], 40, "retrieval-heads")  # 72 - 80 < 4 tokens for the other 4
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "leave less than one token" in err[0]


@pytest.mark.parametrize("argv, says", [
    (["--lengths", "1"], "--lengths must be >= 2"),
    (["--train-lengths", "64"], "--train-lengths > 128"),
    (["--steps", "0"], "--steps and --max-batch must be >= 1"),
    (["--batch", "-3"], "--steps and --max-batch must be >= 1"),
    (["--memory-gib", "nan"], "--memory-gib must be a positive"),
    (["--memory-gib", "inf"], "--memory-gib must be a positive"),
    (["--dtype", "int8"], "--dtype must be"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--steps", "many"], "invalid int value"),
    (["--skip", "everything"], "invalid choice"),
    (["--out", "{dir}"], "is not a regular file"),
    ([], "--out"),  # missing
])
def test_gpu_bench_bad_options_are_one_error_line(argv, says, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if "--out" not in argv and argv:
        argv += ["--out", str(out)]
    with pytest.raises(SystemExit) as e:
        _bench("gpu").parse(["--device", "cpu", *argv] if "--device" not in argv else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not out.exists()


def _peer(name: str):
    """A bench/peers script as a module (its sibling ``args`` importable; kvpress is not needed to parse)."""
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "bench" / "peers")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"peers_{name}", f"{folder}/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(folder)


PEER_CASES = [
    ("tokens", ["--context", "0"], "--context must be >= 1"),
    ("tokens", ["--samples", "-2"], "--samples must be >= 1"),
    ("tokens", ["--score", "x"], "invalid int value"),
    ("tokens", ["--out", "{dir}"], "is not a regular file"),
    ("protocol", ["--tokens", "{d}/none.json"], "cannot read tokens file"),
    ("protocol", ["--tokens", "{f:notjson}"], "is not JSON"),
    ("protocol", ["--tokens", "{f:nokeys}"], "lacks N, M, ids"),
    ("protocol", ["--tokens", "{f:short}"], "ids must be samples of N + M + 1"),
    ("protocol", ["--tokens", "{f:ok}", "--budget", "3"], "--budget must lie in [5, N = 8]"),
    ("protocol", ["--tokens", "{f:ok}", "--budget", "9"], "--budget must lie in [5, N = 8]"),
    ("protocol", ["--tokens", "{f:ok}", "--threads", "0"], "--threads must be >= 1"),
    ("protocol", ["--tokens", "{f:ok}", "--budget", "8", "--out", "{f:ok}"], "is also an input"),
    ("protocol", ["--tokens", "{f:ok}", "--budget", "8", "--allocation", "{d}/none.json"],
     "cannot read allocation"),
    ("run_kvpress", ["--tokens", "{f:ok}", "--budget", "8", "--press", "MagicPress"], "invalid choice"),
    ("run_kvpress", ["--tokens", "{f:ok}", "--budget", "8", "--attn", "flash"], "invalid choice"),
    ("run_kvpress", ["--tokens", "{f:ok}", "--budget", "0"], "--budget must lie in"),
    ("run_kvpress", ["--tokens", "{f:nokeys}"], "lacks N, M, ids"),
    ("table", ["{d}/none.jsonl"], "cannot read result file"),
    ("table", ["{f:notjson}"], "not a peer result row"),
    ("table", ["{f:empty}"], "hold no rows"),
    # the passkey protocol (tokens.py --passkey, and its tokens file given to the other two)
    ("tokens", ["--passkey", "--trials", "0"], "--trials must be >= 1"),
    ("tokens", ["--passkey", "--lengths", "1024", "32"], "--lengths must be >= 64, got [32]"),
    ("tokens", ["--passkey", "--lengths"], "expected at least one argument"),
    ("tokens", ["--passkey", "--depths", "0.5", "1.5"], "--depths must lie in [0, 1], got [1.5]"),
    ("tokens", ["--passkey", "--depths", "nan"], "--depths must lie in [0, 1]"),
    ("tokens", ["--passkey", "--depths", "half"], "invalid float value"),
    ("tokens", ["--passkey", "--context", "512"], "--context does not apply with --passkey"),
    ("tokens", ["--trials", "3", "--depths", "0.5"], "--depths, --trials do not apply without --passkey"),
    ("tokens", ["--passkey", "--seed", "-1"], "--seed must be >= 0"),
    ("tokens", ["--passkey", "--out", "{dir}"], "is not a regular file"),
    ("protocol", ["--tokens", "{f:pk}", "--budget", "9"], "--budget must lie in [5, N = 8]"),
    ("protocol", ["--tokens", "{f:pk}", "--budget", "8", "--out", "{f:pk}"], "is also an input"),
    ("protocol", ["--tokens", "{f:pkkind}"], "unknown kind 'ppl'"),
    ("protocol", ["--tokens", "{f:pknotasks}"], "lacks tasks, model or model_dir"),
    ("protocol", ["--tokens", "{f:pkmissing}"], "task 1 lacks one of length, depth, key, context, question"),
    ("protocol", ["--tokens", "{f:pklength}"], "task 0 must hold context and question token ids"),
    ("run_kvpress", ["--tokens", "{f:pk}", "--budget", "4"], "--budget must lie in [5, N = 8]"),
    ("run_kvpress", ["--tokens", "{f:pkdepth}"], "a depth in [0, 1]"),
    ("run_kvpress", ["--tokens", "{f:pkkey}"], "a digit key"),
    ("run_kvpress", ["--tokens", "{f:pkempty}"], "tasks must be a non-empty list"),
    ("table", ["{f:pkrow}"], "not a peer result row"),
]


def _task(context: int = 8, question: int = 4, **change) -> dict:
    return {"length": context + question, "depth": 0.5, "trial": 0, "key": "12345", "context": [1] * context,
            "question": [2] * question, **change}


def _passkey_file(tasks: list, **change) -> str:
    return json.dumps({"kind": "passkey", "model": "m", "model_dir": "/m", "tasks": tasks, **change})


@pytest.mark.parametrize("script, argv, says", PEER_CASES)
def test_peer_scripts_bad_input_is_one_error_line(script, argv, says, tmp_path, capsys):
    files = {"notjson": "{not json\n", "nokeys": json.dumps({"N": 8}), "empty": "",
             "short": json.dumps({"N": 8, "M": 2, "ids": [[1] * 10], "model": "m", "model_dir": "/m"}),
             "ok": json.dumps({"N": 8, "M": 2, "ids": [[1] * 11], "model": "m", "model_dir": "/m"}),
             "pk": _passkey_file([_task(8), _task(20)]),
             "pkkind": _passkey_file([_task()], kind="ppl"),
             "pknotasks": json.dumps({"kind": "passkey", "model": "m", "model_dir": "/m"}),
             "pkempty": _passkey_file([]),
             "pkmissing": _passkey_file([_task(), {"length": 12, "depth": 0.5, "key": "1", "context": [1]}]),
             "pklength": _passkey_file([_task(length=13)]),
             "pkdepth": _passkey_file([_task(depth=1.5)]),
             "pkkey": _passkey_file([_task(key=12345)]),
             "pkrow": json.dumps({"source": "kvpress", "task": "passkey", "method": "full", "B": None,
                                  "length": 1024, "depth": 0.5, "key": "12345", "correct": True,
                                  "kept_mean": 1012.0})}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    argv = [a.replace("{dir}", str(tmp_path)).replace("{d}", str(tmp_path)) for a in argv]
    argv = [str(tmp_path / f"{a[3:-1]}.json") if a.startswith("{f:") else a for a in argv]
    out = tmp_path / "out.jsonl"
    if script != "table" and "--out" not in argv:
        argv += ["--out", str(out)]
    mod = _peer(script)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        (mod.main if script == "table" else mod.parse)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("reader, file, says", [
    ("read_tokens", "pk", "holds passkey tasks, not NLL samples"),
    ("read_passkey", "nll", "holds NLL samples, not passkey tasks"),
])
def test_a_tokens_file_of_the_other_kind_is_one_error_line(reader, file, says, tmp_path, capsys):
    files = {"pk": _passkey_file([_task()]),
             "nll": json.dumps({"kind": "nll", "N": 8, "M": 2, "ids": [[1] * 11], "model": "m",
                                "model_dir": "/m"})}
    path = tmp_path / f"{file}.json"
    path.write_text(files[file])
    args = _peer("args")
    with pytest.raises(SystemExit) as e:
        getattr(args, reader)(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    spec = args.read_any(path)  # either kind is read by the scripts (they dispatch on it)
    assert spec["kind"] == ("passkey" if file == "pk" else "nll")
    assert args.context_length(spec) == 8


def test_table_passkey_section(tmp_path, capsys):
    def row(source, method, b, depth, answer, **extra):
        return json.dumps({"source": source, "task": "passkey", "method": method, "B": b, "length": 1024,
                           "depth": depth, "trial": 0, "key": "12345", "correct": answer.startswith(" 12345"),
                           "answer": answer, "kept_mean": 1012.0 if b is None else b, **extra})
    kv = [row("kvpress", "full", None, d, " 12345.", matches_one_forward=True) for d in (0.1, 0.9)]
    kv += [row("kvpress", "StreamingLLMPress", 128, d, a) for d, a in ((0.1, " 999"), (0.9, " 12345."))]
    hk = [row("headkv", "full", None, d, " 12345.", matches_one_forward=True) for d in (0.1, 0.9)]
    hk += [row("headkv", "B_streaming_128", 128, d, a) for d, a in ((0.1, " 999"), (0.9, " 12345."))]
    (tmp_path / "kv.jsonl").write_text("\n".join(kv) + "\n")
    (tmp_path / "hk.jsonl").write_text("\n".join(hk) + "\n")
    _peer("table").main([str(tmp_path / "kv.jsonl"), str(tmp_path / "hk.jsonl")])
    out = capsys.readouterr().out
    assert "| kvpress | full | full | 100.0 (2/2) |" in out
    assert "| headkv | B_streaming_128 | 128 | 50.0 (1/2) |" in out
    assert ("cross-check B = 128: kvpress StreamingLLMPress and headkv B_streaming_128 give the same answer "
            "on 2 of 2 tasks") in out
    assert "check headkv: the masked full-attention decode equals a plain one-forward + cached decode" in out


def _alloc_file(tmp_path):
    from conftest import tiny_model

    from headkv.alloc.allocation import Allocation
    from headkv.models.loading import model_shape

    s = model_shape(tiny_model("llama"))
    alloc = Allocation.uniform(s.shape, 4, 12, model_id=s.model_id, q_per_kv=s.q_per_kv)
    return alloc.save(tmp_path / "a.json")


@pytest.mark.parametrize("bench,argv,says", [
    ("dynamic_cost", ["{alloc}", "--lengths", "1"], "--lengths and --decode-at must be >= 2"),
    ("dynamic_cost", ["{alloc}", "--repeats", "0"], "--repeats and --threads >= 1"),
    ("dynamic_cost", ["{alloc}", "--decay", "2"], "decay"),
    ("dynamic_cost", ["{alloc}", "--recent", "0"], "recent"),
    ("dynamic_cost", ["{dir}/missing.json"], "cannot read allocation file"),
    ("dynamic_cost", ["{alloc}", "--out", "{dir}"], "is not a regular file"),
    ("dynamic_cost", [], "the following arguments are required"),
    ("fill_rule", ["{alloc}", "--grid", "4,8"], "not enough values"),
    ("fill_rule", ["{alloc}", "--grid", "4,0,0.5"], "chunk"),
    ("fill_rule", ["{alloc}", "--blocks", "0"], "--blocks, --comp-blocks and --threads must be >= 1"),
    ("fill_rule", ["{alloc}", "--out", "{dir}"], "is not a regular file"),
    ("fill_rule", ["{dir}/missing.json"], "cannot read allocation file"),
    ("scaled", ["{alloc}", "--budget", "2", "--out", "{dir}/o.json"], "less than one window key"),
    ("scaled", ["{alloc}", "--budget", "nan", "--out", "{dir}/o.json"], "--budget must be a positive"),
    ("scaled", ["{alloc}", "--budget", "16", "--out", "{dir}"], "is not a regular file"),
    ("scaled", ["{alloc}", "--out", "{dir}/o.json"], "--budget"),
    ("gpu", ["--dynamic-lengths", "1", "--device", "cpu", "--out", "{dir}/g.json"], "--lengths must be >= 2"),
])
def test_dynamic_benches_bad_options_are_one_error_line(bench, argv, says, tmp_path, capsys):
    """bench/dynamic_cost.py, fill_rule.py, scaled.py, gpu.py's dynamic section: one line, exit 2, no file."""
    alloc = _alloc_file(tmp_path)
    before = set(tmp_path.iterdir())
    argv = [a.replace("{alloc}", str(alloc)).replace("{dir}", str(tmp_path)) for a in argv]
    mod = _bench(bench)
    with pytest.raises(SystemExit) as e:
        (mod.parse if bench in ("gpu", "dynamic_cost") else mod.main)(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert set(tmp_path.iterdir()) == before
