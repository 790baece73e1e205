"""The house's rules, checked: models/ is the ground, one door, a thin CLI, every config file loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports; ``from headkv import cli`` counts as ``headkv.cli``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in ("headkv", "headkv.models", "headkv.alloc", "headkv.classify"):
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _sources() -> list[Path]:
    """The project's Python files (the checkout's, not its virtualenv's or build's)."""
    skip = {".venv", "build", ".git", ".pytest_cache"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


# the floors: a room imports nothing from the rooms above it (models/ is the ground floor)
ROOMS = [("models", ("alloc", "classify", "cli")), ("alloc", ("classify", "cli")), ("classify", ("cli",))]


@pytest.mark.parametrize("room, above", ROOMS)
def test_rooms_import_only_what_lies_below_them(room, above):
    paths = sorted((ROOT / room).rglob("*.py"))
    assert paths
    for path in paths:
        bad = {m for m in _imports(path) if m.split(".")[:2] in [["headkv", a] for a in above]}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_package_is_headkv_and_nothing_imports_a_bare_room():
    """Installed, the rooms are headkv.models, headkv.alloc, headkv.classify and headkv.cli: no code (tests
    and bench scripts included) imports them by a top-level name that would squat on ``models`` or ``cli``."""
    for path in _sources():
        bad = {m for m in _imports(path) if m.split(".")[0] in ("models", "alloc", "classify", "cli")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_import_headkv_is_light():
    """``import headkv`` loads neither torch, transformers, lightning nor wandb (its names resolve lazily)."""
    import subprocess
    import sys

    code = ("import sys, headkv; heavy = [m for m in ('torch', 'transformers', 'lightning', 'wandb') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"
    code = "import headkv, sys; headkv.Allocation; print('lightning' in sys.modules, 'wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False False"


def test_transformers_internals_live_in_one_place():
    for path in _sources():
        text = path.read_text()
        assert "_global_mapping" not in text or path.name == "test_layout.py", path
        if path.relative_to(ROOT).parts[0] in ("alloc", "classify") or path.name == "cli.py":
            assert "AttentionInterface" not in text and "_attn_implementation" not in text, path


def test_an_allocation_reaches_a_model_only_through_applied():
    rooms = [*ROOT.glob("alloc/**/*.py"), *ROOT.glob("classify/**/*.py"), *ROOT.glob("bench/*.py")]
    for path in [*rooms, ROOT / "cli.py"]:
        text = path.read_text()
        assert "PerHeadCache(" not in text and "HardMask(" not in text or path.name == "allocation.py", path


def test_cli_is_thin():
    assert len((ROOT / "cli.py").read_text().splitlines()) <= 450


CONFIGS = {"evaluate": "EvaluateConfig", "classify": "ClassifyConfig", "ablation": "SweepConfig",
           "learned": "SweepConfig", "quantized": "SweepConfig", "passkey": "PasskeyConfig", "train": None,
           "gemma": "SweepConfig", "gemma_4096": "SweepConfig", "long": "SweepConfig",
           "controls": "SweepConfig", "other_text": "SweepConfig", "passkey_4096": "PasskeyConfig",
           "coverage": "SweepConfig", "coverage_4096": "SweepConfig"}


def test_every_config_file_loads_through_its_commands_dataclass():
    import headkv.alloc.config as config
    from headkv.alloc.config import TrainConfig

    assert {p.stem for p in (ROOT / "configs").glob("*.yaml")} == set(CONFIGS)
    for name, cls in CONFIGS.items():
        path = ROOT / "configs" / f"{name}.yaml"
        if cls is None:
            cfg = config.load(TrainConfig, path, {"budget": 64})
        else:
            cfg = config.load(getattr(config, cls), path, {})
        assert cfg is not None


def test_the_configs_choices_are_the_librarys():
    """alloc/config.py states the attention backends without importing torch; they are the library's."""
    import headkv.alloc.config as config
    from headkv.models.attention import BACKENDS

    assert config.BACKENDS == BACKENDS
