"""The benches' own options: bad values end with one ``error:`` line and exit 2 before anything is written."""

from __future__ import annotations

import importlib.util
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
