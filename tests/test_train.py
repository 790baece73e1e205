"""The Lightning trainer on a tiny model: frozen base, budget held, checkpoint/resume/export round trips,
the CLI from train to evaluate, and one-line errors on bad input."""

from __future__ import annotations

import csv
import os
import pickle
import shlex
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from headkv import cli
from headkv.alloc.allocation import Allocation
from headkv.alloc.config import TrainConfig, TrainError
from headkv.alloc.runs import RESUME_KEYS, check_resume, load_checkpoint_meta, resume_run_dir
from headkv.alloc.train import export_checkpoint, fit, lr_factor, tau_at
from headkv.models.common import HeadkvError
from headkv.models.loading import load_model
from headkv.models.text import load_documents

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    objective="kl",
    budget=12,
    seq_len=32,
    max_steps=4,
    val_blocks=1,
    eval_every=2,
    log_every=1,
    ckpt_every=2,
    lr=0.3,
    wandb_mode="disabled",
    threads=1,
)


def make_tiny_dir(path: Path, tokenizer, layers: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm):
    """A tiny Llama with the offline default's tokenizer (saved as a model dir), and a small text corpus."""
    root = tmp_path_factory.mktemp("train")
    tok = AutoTokenizer.from_pretrained(smollm[1].name_or_path)
    text = "\n\n".join(load_documents("austen", "train")[0].split("\n\n")[:400])
    (root / "text.txt").write_text(text)
    return {
        "model": make_tiny_dir(root / "tiny", tok),
        "other": make_tiny_dir(root / "other", tok, layers=3),
        "corpus": str(root / "text.txt"),
    }


@pytest.fixture
def tiny_lm(assets):
    return load_model(str(assets["model"]))


def config(assets, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "model": str(assets["model"]), "corpus": assets["corpus"], **kw})


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:
    """A finished 2-step run directory (read-only for the tests that share it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    lm, tok = load_model(str(assets["model"]))
    fit(lm, tok, config(assets, max_steps=2), run_dir, "t-trained", progress=False)
    return run_dir


def gate_logits(run_dir: Path) -> torch.Tensor:
    return load_checkpoint_meta(run_dir)[1]["gates.logits"]


def test_training_freezes_the_base_holds_the_budget_and_checkpoints_only_gates(
    assets, tiny_lm, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    lm, tok = tiny_lm
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    alloc = fit(lm, tok, config(assets, wandb_mode="offline"), tmp_path / "run", "t-offline", progress=False)
    after = lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical base weights
    assert not any(p.requires_grad for p in lm.parameters())
    meta, state = load_checkpoint_meta(tmp_path / "run")
    assert list(state) == ["gates.logits"] and meta["global_step"] == 4  # no frozen weights in the checkpoint
    assert float(state["gates.logits"].abs().max()) > 0  # the gates did learn
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    violations = [abs(float(r["budget/violation"])) for r in rows if r.get("budget/violation")]
    assert len(violations) == 4 and max(violations) < 1e-3
    assert [r["step"] for r in rows if r.get("val/ppl")] == ["0", "2", "4"]  # periodic hard-export eval
    assert Allocation.load(tmp_path / "run" / "allocation.json") == alloc
    assert alloc.meta["steps"] == 4 and alloc.meta["run_id"] == "t-offline" and alloc.meta["budget"] == 12
    assert (tmp_path / "run" / "heatmap.png").stat().st_size > 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # wandb offline, under the run dir
    assert not (tmp_path / "wandb").exists()
    assert export_checkpoint(tmp_path / "run") == alloc  # export round trip


def test_a_bfloat16_model_trains_float32_gates_like_a_float32_model(assets, tmp_path):
    """dtype: bfloat16 runs the frozen model in bfloat16 (2x faster on a CPU with AVX-512 BF16); the gates
    and their optimizer stay float32, the base stays bit-identical, and the gates learn what float32
    learns."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        lm, tok = load_model(str(assets["model"]), dtype=getattr(torch, dtype))
        before = {k: v.clone() for k, v in lm.state_dict().items()}
        fit(lm, tok, config(assets, dtype=dtype), tmp_path / dtype, f"t-{dtype}", progress=False)
        assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
        assert lm.dtype == getattr(torch, dtype)
        runs[dtype] = gate_logits(tmp_path / dtype)
    assert runs["bfloat16"].dtype == torch.float32
    assert load_checkpoint_meta(tmp_path / "bfloat16")[0]["config"]["dtype"] == "bfloat16"
    cos = torch.nn.functional.cosine_similarity(runs["float32"].flatten(), runs["bfloat16"].flatten(), 0)
    assert float(runs["float32"].abs().max()) > 0.1 and float(cos) > 0.9, (runs, cos)
    with pytest.raises(TrainError, match="model is bfloat16 but the run's dtype is float32"):
        fit(lm, tok, config(assets), tmp_path / "mismatch", "t-mismatch", progress=False)
    assert not (tmp_path / "mismatch").exists()


def test_a_cross_entropy_run_is_named_for_its_objective(assets, tiny_lm, tmp_path):
    """learned_ce_b12 beside learned_b12 (KL): one sweep table keeps both objectives apart."""
    lm, tok = tiny_lm
    alloc = fit(lm, tok, config(assets, objective="ce", max_steps=2), tmp_path / "ce", "t-ce", progress=False)
    assert alloc.meta["policy"] == "learned_ce_b12" and alloc.meta["objective"] == "ce"
    assert export_checkpoint(tmp_path / "ce", 9).meta["policy"] == "learned_ce_b9"
    assert float(gate_logits(tmp_path / "ce").abs().max()) > 0


def test_a_mix_run_and_a_warm_start(assets, tiny_lm, tmp_path):
    """objective mix is the mean of KL and CE per token; init starts the gates from an allocation (a wrong
    model's or a missing file is one TrainError before anything is written)."""
    from headkv.alloc.gates import WindowGates
    from headkv.alloc.train import distill_loss
    from headkv.models.loading import model_shape

    lm, tok = tiny_lm
    x = torch.randint(0, 100, (1, 32))
    gates = WindowGates(model_shape(lm).shape, 12.0, 32, 4)
    with torch.no_grad():
        gates.logits.copy_(torch.randn(gates.shape, generator=torch.Generator().manual_seed(0)))
    loss = {o: float(distill_loss(lm, gates, x, 2.0, o).detach()) for o in ("kl", "ce", "mix")}
    assert loss["mix"] == pytest.approx(0.5 * (loss["kl"] + loss["ce"]), rel=1e-5)
    source = gates.export(q_per_kv=model_shape(lm).q_per_kv)
    path = source.save(tmp_path / "init.json")
    alloc = fit(lm, tok, config(assets, objective="mix", max_steps=1, init=str(path), lr=1e-6),
                tmp_path / "mix", "t-mix", progress=False)
    assert alloc.meta["policy"] == "learned_mix_b12"
    assert (alloc.tensors()[1] - source.tensors()[1]).abs().max() <= 1  # started where the source is
    other = Allocation.uniform((5, 2), 4, 8, q_per_kv=2).save(tmp_path / "other.json")
    bad_inits = ((other, "--init: allocation .* has shape 5x2"),
                 (tmp_path / "none.json", "--init: cannot read"))
    for bad, why in bad_inits:
        with pytest.raises(TrainError, match=why):
            fit(lm, tok, config(assets, init=str(bad)), tmp_path / "bad", "t-bad", progress=False)
        assert not (tmp_path / "bad").exists()


def test_learned_sinks_train_export_and_round_trip(assets, tiny_lm, tmp_path):
    """sink_max: the run learns integer sinks per head within [0, sink_max] under the budget; the checkpoint
    holds their logits and exports the same allocation; a checkpoint whose sink logits do not match its
    config is refused in one line."""
    lm, tok = tiny_lm
    cfg = config(assets, sink_max=8, max_steps=3, lr=1.0)
    alloc = fit(lm, tok, cfg, tmp_path / "s", "t-s", progress=False)
    sink, _ = alloc.tensors()
    assert alloc.eff_ctx() <= 12 + 1e-9 and int(sink.min()) >= 0 and int(sink.max()) <= 8
    assert float(load_checkpoint_meta(tmp_path / "s")[1]["gates.sink_logits"].std()) > 0  # they moved apart
    assert export_checkpoint(tmp_path / "s") == alloc
    ckpt = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["state_dict"]["gates.sink_logits"]
    torch.save(ckpt, tmp_path / "torn.ckpt")
    with pytest.raises(TrainError, match="malformed gates.sink_logits"):
        load_checkpoint_meta(tmp_path / "torn.ckpt")


class StopAt(L.Callback):
    """Interrupt a run after ``step`` optimizer steps, as a killed job would be."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def test_resume_continues_exactly_where_the_run_stopped(assets, tiny_lm, tmp_path, monkeypatch):
    """Also the schedules: a cosine learning rate resumes at the step it stopped."""
    lm, tok = tiny_lm
    kw = dict(lr_schedule="cosine")
    fit(lm, tok, config(assets, **kw), tmp_path / "straight", "t-straight", progress=False)
    fit(lm, tok, config(assets, **kw), tmp_path / "split", "t-split", progress=False, callbacks=[StopAt(2)])
    assert load_checkpoint_meta(tmp_path / "split")[0]["global_step"] == 2
    calls, load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fit(
        lm,
        tok,
        config(assets, **kw),
        tmp_path / "split",
        "t-split",
        resume=tmp_path / "split/checkpoints/last.ckpt",
        progress=False,
    )
    assert len(calls) >= 2 and all(w is True for w in calls), calls  # ours and Lightning's: both safe
    assert load_checkpoint_meta(tmp_path / "split")[0]["global_step"] == 4
    assert torch.allclose(gate_logits(tmp_path / "straight"), gate_logits(tmp_path / "split"), atol=1e-6)


def test_tau_schedules_anneal_from_start_to_end():
    for schedule in ("exp", "linear"):
        cfg = TrainConfig(budget=12, max_steps=11, tau_schedule=schedule)
        taus = [tau_at(cfg, s) for s in range(11)]
        assert taus[0] == pytest.approx(cfg.tau_start) and taus[-1] == pytest.approx(cfg.tau_end)
        assert all(a > b for a, b in zip(taus, taus[1:], strict=False))
    assert tau_at(TrainConfig(budget=12, tau_schedule="const"), 7) == 8.0


def test_cosine_lr_decays_from_lr_to_its_end_fraction():
    cfg = TrainConfig(budget=12, max_steps=11, lr_schedule="cosine", lr_end_frac=0.1)
    factors = [lr_factor(cfg, s) for s in range(11)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert lr_factor(TrainConfig(budget=12, lr_schedule="const"), 7) == 1.0
    with pytest.raises(TrainError, match="lr_schedule"):
        TrainConfig.from_dict({"budget": 12, "lr_schedule": "step"})


def test_every_key_of_the_shipped_config_is_a_train_option():
    values = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    assert set(values) == set(TrainConfig().to_dict()) - {"budget", "encoding"}
    assert TrainConfig.from_dict({**values, "budget": 64}).seq_len == values["seq_len"]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["headkv", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def test_cli_train_export_evaluate_end_to_end(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "budget"}))
    common = ["--model", assets["model"], "--corpus", assets["corpus"]]
    code, out, err = run_cli(
        monkeypatch, capsys, "train", *common, "--budget", 12, "--config", cfg, "--out-dir", "runs/b12"
    )
    assert code == 0, err
    assert "Eff.Ctx 12.00" in out and (tmp_path / "runs/b12/allocation.json").exists()
    code, out, err = run_cli(monkeypatch, capsys, "export", "runs/b12", "--budget", 9, "-o", "b9.json")
    assert code == 0, err
    b9 = Allocation.load(tmp_path / "b9.json")
    assert b9.eff_ctx() == pytest.approx(9) and b9.meta["policy"] == "learned_b9"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "evaluate",
        *common,
        "--allocation",
        "runs/b12/allocation.json",
        "--allocation",
        "b9.json",
        "--policy",
        "B_streaming_12",
        "--tokens",
        62,
        "--seq-len",
        31,
        "--out",
        "rows.jsonl",
    )
    assert code == 0, err
    assert "learned_b12" in out and "learned_b9" in out and "B_streaming_12" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("low_budget", "budget 4 is infeasible"),
        ("high_budget", "budget 40 is infeasible"),
        ("missing_budget", "missing config key 'budget'"),
        ("unknown_key", "unknown key(s) windowz"),
        ("other_model", "cannot resume"),
        ("export_other_model", "is from model"),
        ("not_a_checkpoint", "cannot read checkpoint"),
        ("export_budget", "budget 2 is infeasible"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    assets, tmp_path, monkeypatch, capsys, request, case, message
):
    monkeypatch.chdir(tmp_path)
    fake_run = tmp_path / "fake"
    (fake_run / "checkpoints").mkdir(parents=True)
    (fake_run / "checkpoints" / "last.ckpt").write_text("not a checkpoint")
    (tmp_path / "bad.yaml").write_text("windowz: 3\n")
    common = [
        "--model",
        assets["model"],
        "--corpus",
        assets["corpus"],
        "--seq-len",
        32,
        "--wandb-mode",
        "disabled",
        "--out-dir",
        "out",
    ]
    args = {
        "low_budget": ["train", *common, "--budget", 4],
        "high_budget": ["train", *common, "--budget", 40],
        "missing_budget": ["train", *common],
        "unknown_key": ["train", *common, "--budget", 12, "--config", "bad.yaml"],
        "other_model": ["train", "--model", assets["other"], "--resume", "RUN", "--out-dir", "out"],
        "export_other_model": ["export", "RUN", "--model", assets["other"], "-o", "out/x.json"],
        "not_a_checkpoint": ["export", fake_run, "-o", "out/x.json"],
        "export_budget": ["export", "RUN", "--budget", 2, "-o", "out/x.json"],
    }[case]
    if "RUN" in args:
        run_dir = request.getfixturevalue("trained")
        args = [a if a != "RUN" else run_dir for a in args]
        capsys.readouterr()
    code, out, err = run_cli(monkeypatch, capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_train_config_refuses_unknown_and_invalid_values():
    with pytest.raises(TrainError, match="unknown config key"):
        TrainConfig.from_dict({"budget": 64, "windowz": 1})
    with pytest.raises(TrainError, match="objective"):
        TrainConfig.from_dict({"budget": 64, "objective": "mse"})
    with pytest.raises(TrainError, match="infeasible"):
        TrainConfig.from_dict({"budget": 2048})
    for key, value, message in [
        ("seed", "x", "seed must be an integer, got 'x'"),
        ("sink", True, "sink must be an integer, got True"),
        ("lr", "0.1", "lr must be a number, got '0.1'"),
        ("budget", "64", "budget must be a number, got '64'"),
        ("model", 5, "model must be a string, got 5"),
    ]:
        with pytest.raises(TrainError, match=message):
            TrainConfig.from_dict({"budget": 64, key: value})
    assert TrainConfig.from_dict({"budget": 64, "precision": 32, "lr": 1}).lr == 1


class RunsCode:
    """A pickle that runs a shell command when it is unpickled: what a crafted checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    """(marker, files): crafted pickles in every form torch.load reads, each named like a checkpoint."""
    marker = tmp_path / "pwned"
    payload = {"headkv": RunsCode(marker), "state_dict": {"gates.logits": torch.zeros(2, 2)}}
    files = []
    for name, save in [
        ("torch_zip.ckpt", lambda obj, f: torch.save(obj, f)),
        ("torch_legacy.ckpt", lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False)),
        ("plain_pickle.ckpt", lambda obj, f: pickle.dump(obj, open(f, "wb"))),
    ]:
        save(payload, tmp_path / name)
        files.append(tmp_path / name)
    run = tmp_path / "crafted_run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save(payload, run / "last.ckpt")
    files.append(tmp_path / "crafted_run")  # a run directory: its checkpoints/last.ckpt
    return marker, files


def one_line_naming(err: TrainError, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_the_crafted_pickle_would_run_code_if_unpickled(tmp_path):
    """The premise of the tests below: unpickling these files unsafely does run the command."""
    marker, files = crafted_checkpoints(tmp_path)
    pickle.load(open(files[2], "rb"))
    assert marker.exists()


def test_a_crafted_checkpoint_never_runs_code(assets, tiny_lm, tmp_path, monkeypatch, capsys):
    """Export, load and resume (library and CLI) refuse a pickle with objects in it, without running it."""
    monkeypatch.chdir(tmp_path)
    marker, files = crafted_checkpoints(tmp_path)
    lm, tok = tiny_lm
    for path in files:
        shown = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        for load in (
            load_checkpoint_meta,
            export_checkpoint,
            lambda p: fit(lm, tok, config(assets), tmp_path / "out", "t-crafted", resume=p, progress=False),
        ):
            with pytest.raises(TrainError) as e:
                load(path)
            msg = one_line_naming(e.value, shown)
            assert "cannot read checkpoint" in msg and "not a plain-tensor checkpoint" in msg, msg
            if path.name != "plain_pickle.ckpt":  # pickle protocol 4 fails earlier, on an opcode
                assert f"it would call {os.system.__module__}.system" in msg, msg
        for args in (["export", path, "-o", "out/x.json"], ["train", "--resume", path, "--out-dir", "out"]):
            code, out, err = run_cli(monkeypatch, capsys, *args)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot read checkpoint"), err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unreadable_or_malformed_checkpoints_are_one_line_train_errors(trained, tmp_path):
    real = trained / "checkpoints" / "last.ckpt"
    ckpt = torch.load(real, map_location="cpu", weights_only=True)  # headkv's own checkpoints load safely
    meta = ckpt["headkv"]
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cases = {
        text: "cannot read checkpoint",
        torn: "cannot read checkpoint",
        empty: "cannot read checkpoint",
        tmp_path / "nothing.ckpt": "does not exist",
        tmp_path: "does not exist",  # a directory without checkpoints/last.ckpt
    }
    def with_meta(**kw):
        return {**ckpt, "headkv": {**meta, **kw}}

    def with_logits(logits):
        return {**ckpt, "state_dict": {"gates.logits": logits}}

    no_run_id = {**ckpt, "headkv": {k: v for k, v in meta.items() if k != "run_id"}}
    bad = {
        "foreign.ckpt": ({"state_dict": {"w": torch.zeros(2)}}, "is not a headkv training checkpoint"),
        "list.ckpt": ([1, 2, 3], "is not a headkv training checkpoint"),
        "meta_list.ckpt": ({**ckpt, "headkv": [1]}, "malformed"),
        "no_run_id.ckpt": (no_run_id, "lacks run_id"),
        "no_gates.ckpt": ({**ckpt, "state_dict": {}}, "lacks gates.logits"),
        "shape_str.ckpt": (with_meta(shape="2x2"), "malformed shape"),
        "logits_shape.ckpt": (with_logits(torch.zeros(3, 5)), "malformed gates.logits"),
        "logits_int.ckpt": (with_logits(torch.zeros(2, 2, dtype=torch.long)), "malformed gates.logits"),
        "step_str.ckpt": ({**ckpt, "global_step": "4"}, "malformed global_step"),
        "config_str.ckpt": (with_meta(config="budget=12"), "malformed config"),
        "config_bad.ckpt": (with_meta(config={**meta["config"], "sink": "four"}), "bad config"),
        "config_key.ckpt": (with_meta(config={**meta["config"], "x": 1}), "bad config"),
    }
    for name, (obj, message) in bad.items():
        torch.save(obj, tmp_path / name)
        cases[tmp_path / name] = message
    for path, message in cases.items():
        shown = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        for load in (load_checkpoint_meta, export_checkpoint):
            with pytest.raises(TrainError) as e:
                load(path)
            assert message in one_line_naming(e.value, shown), (path.name, str(e.value))
    assert issubclass(TrainError, HeadkvError)


def test_resume_needs_the_optimizer_state_and_the_same_configuration(assets, tiny_lm, trained, tmp_path):
    lm, tok = tiny_lm
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    gates_only = tmp_path / "gates" / "checkpoints" / "last.ckpt"
    gates_only.parent.mkdir(parents=True)
    torch.save({k: ckpt[k] for k in ("headkv", "state_dict", "global_step")}, gates_only)
    assert export_checkpoint(gates_only) == export_checkpoint(trained)  # enough to export ...
    with pytest.raises(TrainError, match="holds no optimizer, scheduler and loop state"):  # ... not to resume
        fit(lm, tok, config(assets, max_steps=2), tmp_path / "gates", "t-gates", resume=gates_only)
    with pytest.raises(TrainError) as e:
        changed = config(assets, max_steps=2, objective="ce", lr=0.1)
        fit(lm, tok, changed, tmp_path / "out", "t-x", resume=trained)
    path = trained / "checkpoints" / "last.ckpt"
    assert str(e.value) == (
        f"cannot resume {path}: it was trained with lr=0.3, objective=kl; this run asks lr=0.1, objective=ce"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "gates" / "csv").exists()


def test_check_resume_lists_every_changed_key_that_changes_the_result():
    saved = TrainConfig(budget=12, batch_size=1, objective="kl").to_dict()
    check_resume(saved, TrainConfig(budget=12))  # the same run
    logistics = dict(threads=3, wandb_mode="disabled", wandb_project="p", log_every=7, eval_every=9,
                     ckpt_every=11, accelerator="gpu", strategy="ddp", attention="dense")
    check_resume(saved, TrainConfig(budget=12, **logistics))  # free to change
    with pytest.raises(TrainError) as e:
        check_resume(saved, TrainConfig(budget=12, batch_size=2, objective="ce"), "runs/b/checkpoints/x.ckpt")
    assert str(e.value) == (
        "cannot resume runs/b/checkpoints/x.ckpt: it was trained with batch_size=1, objective=kl; "
        "this run asks batch_size=2, objective=ce"
    )
    changed = dict(
        model="other", corpus="pg19", encoding="latin-1", budget=16,
        sink=2, sink_max=8, seq_len=512, batch_size=4, max_steps=50, lr=0.1,
        lr_schedule="const", lr_end_frac=0.5, tau_start=4.0, tau_end=1.0, tau_schedule="linear", edge="log",
        objective="ce", init="runs/x/allocation.json", n_blocks=7, passkey_mix=0.25, val_blocks=2,
        dtype="bfloat16", precision="bf16-mixed", devices=2, seed=1,
    )
    assert set(changed) == set(RESUME_KEYS)
    assert set(RESUME_KEYS) | set(logistics) == set(TrainConfig().to_dict())  # every field decided
    for key, value in changed.items():
        with pytest.raises(TrainError, match=f"trained with {key}=.*; this run asks {key}={value}$"):
            check_resume(saved, TrainConfig(**{**saved, key: value}))
    with pytest.raises(TrainError) as e:
        check_resume(saved, TrainConfig(**{**saved, **changed}))
    assert all(f"{k}=" in str(e.value) for k in changed) and "\n" not in str(e.value)
    old = {k: v for k, v in saved.items() if k != "lr_end_frac"}  # a checkpoint older than a key: its default
    check_resume(old, TrainConfig(budget=12))
    with pytest.raises(TrainError, match="lr_end_frac=0.1; this run asks lr_end_frac=0.2"):
        check_resume(old, TrainConfig(budget=12, lr_end_frac=0.2))
    assert issubclass(TrainError, HeadkvError)


def test_passkey_mix_replaces_that_share_of_training_blocks_with_answered_passkey_tasks(assets):
    """--passkey-mix 0.25: a quarter of the training blocks, spread over the run, are needle + question +
    answer on TRAIN-split filler (the held-out blocks stay text); the rest is the plain run's blocks."""
    from headkv.alloc.passkey import NEEDLE, QUESTION
    from headkv.alloc.train import TrainBlocks

    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    plain = TrainBlocks(tok, config(assets, seq_len=96, max_steps=8))
    mixed = TrainBlocks(tok, config(assets, seq_len=96, max_steps=8, passkey_mix=0.25))
    plain.setup(), mixed.setup()
    assert torch.equal(plain.val, mixed.val) and mixed.train.shape == plain.train.shape == (8, 96)
    changed = [i for i in range(8) if not torch.equal(plain.train[i], mixed.train[i])]
    assert changed == [2, 6]  # round(0.25 x 8) blocks at (i + 0.5) x 8 / 2
    for i in changed:
        text = tok.decode(mixed.train[i])
        key = text.rsplit(QUESTION, 1)[1].strip().rstrip(".")
        assert len(key) == 5 and NEEDLE.format(key=key) in text and text.endswith(f"{QUESTION} {key}.")
    again = TrainBlocks(tok, config(assets, seq_len=96, max_steps=8, passkey_mix=0.25))
    again.setup()
    assert torch.equal(again.train, mixed.train)  # seeded
    with pytest.raises(TrainError, match="passkey_mix must lie in"):
        config(assets, passkey_mix=1.5)


def test_a_log_edge_run(assets, tiny_lm, tmp_path):
    """--edge log reaches the student's mask (keys far beyond a window keep some weight, so the loss
    differs from the linear edge's at the same windows: tests/test_window.py has the edge itself); a run
    trains and exports under the exact budget with it; its tau must be below 1."""
    from headkv.alloc.gates import WindowGates
    from headkv.alloc.train import distill_loss
    from headkv.models.loading import model_shape

    lm, tok = tiny_lm
    x = torch.randint(0, 100, (1, 64))
    gates = WindowGates(model_shape(lm).shape, 6.0, 64, 0)  # windows of 6 in 64-token blocks
    with torch.no_grad():
        loss = {edge: float(distill_loss(lm, gates, x, 0.5, "ce", edge=edge)) for edge in ("linear", "log")}
        hard = float(distill_loss(lm, gates, x, 1e-4, "ce", edge="log"))
    assert abs(loss["log"] - loss["linear"]) > 1e-4
    assert hard == pytest.approx(float(distill_loss(lm, gates, x, 1e-4, "ce")), rel=1e-5)  # the same limit
    alloc = fit(lm, tok, config(assets, max_steps=2, edge="log", tau_start=0.5, tau_end=0.1),
                tmp_path / "log", "t-log", progress=False)
    assert abs(alloc.eff_ctx() - 12) < 1e-9
    with pytest.raises(TrainError, match="the log edge needs tau_start and tau_end below 1"):
        config(assets, edge="log")


def test_resume_run_dir_is_the_directory_that_holds_the_checkpoint(trained, tmp_path):
    assert resume_run_dir(load_checkpoint_meta(trained)[0]) == trained
    assert resume_run_dir(load_checkpoint_meta(trained / "checkpoints" / "last.ckpt")[0]) == trained
    assert resume_run_dir({"path": "runs/b12/checkpoints/step2.ckpt"}) == Path("runs/b12")
    assert resume_run_dir({"path": "runs/b12/checkpoints/../checkpoints/last.ckpt"}) == Path("runs/b12")
    stray = tmp_path / "copy.ckpt"
    stray.write_bytes((trained / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(TrainError, match=f"cannot resume {stray}: it is not in a run directory"):
        resume_run_dir(load_checkpoint_meta(stray)[0])
