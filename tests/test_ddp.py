"""DDP over 2 CPU processes (gloo) learns the same gates as one process given the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import TINY, assets, make_tiny_dir  # noqa: F401  (the module fixture)

from headkv.alloc.runs import load_checkpoint_meta

HEADKV = Path(sys.executable).parent / "headkv"


def train(tmp_path: Path, assets: dict, name: str, *flags: str) -> torch.Tensor:  # noqa: F811
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "budget"}, "max_steps": 3}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HEADKV_RUN_ID", None)
    cmd = [
        str(HEADKV),
        "train",
        "--model",
        str(assets["model"]),
        "--corpus",
        assets["corpus"],
        "--budget",
        "12",
        "--config",
        str(cfg),
        "--out-dir",
        str(tmp_path / name),
        "--accelerator",
        "cpu",
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta, state = load_checkpoint_meta(tmp_path / name)
    assert meta["global_step"] == 3
    return state["gates.logits"]


@pytest.mark.timeout(900)
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):  # noqa: F811
    one = train(tmp_path, assets, "one", "--devices", "1", "--batch-size", "2")
    ddp = train(tmp_path, assets, "ddp", "--devices", "2", "--strategy", "ddp", "--batch-size", "1")
    assert float(one.abs().max()) > 0.1  # the gates moved
    assert torch.allclose(one, ddp, atol=1e-5, rtol=1e-4), (one, ddp)
