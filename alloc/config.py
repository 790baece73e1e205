"""Every command's options, stated once: one dataclass per command (litgpt's ``args.py``).

Each field carries its default and its help (``opt``); the CLI builds its flags from these fields, a YAML
config may set any of them (keys and value types are checked against the fields), and flags given on the
command line win. ``check()`` rejects bad values with one line before any model is loaded, and
``check_output`` makes sure an output path can be written before any compute.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from headkv.models.common import HeadkvError
from headkv.models.dynamic import Fill

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("auto", "flex", "dense")  # models.attention.windowed's; checked equal by a test
OBJECTIVES = ("kl", "ce", "mix")  # alloc.train.distill_loss's
MAX_TOKENS = 10**8  # far beyond any corpus split; stops values that would overflow a tensor size


class ConfigError(HeadkvError):
    """An option, config file or value that cannot be used."""


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A documented option. ``rules``: ``choices``, ``lo``/``hi`` (inclusive bounds), ``flag`` (extra names),
    ``arg`` (a positional argument)."""
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


MODEL = "Hub name, local model directory, or smollm2-135m (offline default)."
CORPUS = (
    "austen (offline default), pydoc or debian-reference (offline non-fiction), a .txt file or directory,"
    " wikitext-2-raw-v1 or pg19."
)
ENCODING = "Text encoding of a local corpus (default strict UTF-8; e.g. latin-1)."
DEVICE = "cpu (default) or cuda[:N]."
DTYPE = "float32 (CPU default), bfloat16 (GPU default) or float16."
POLICY = "Policy name, e.g. B_streaming_128, A_window_64 or full. Repeatable."
ALLOCATION = "Allocation JSON file (fixed, learned or quantized). Repeatable."
PROFILE = "Head profile JSON from `headkv classify`, for the G/I/J/K families."
ATTENTION = ("Attention kernel of masked forwards: auto (FlexAttention block mask from 1024 tokens on, else dense), "
             "flex, or dense (SDPA plus a bias: the reference).")
CONFIG = "YAML file with any of these options; flags override it."


@dataclass
class EvaluateConfig:
    model: str = opt("smollm2-135m", MODEL)
    corpus: str = opt("austen", CORPUS)
    encoding: Optional[str] = opt(None, ENCODING)
    split: str = opt("eval", "Corpus split: eval (never used for training) or train.", choices=("eval", "train", "test"))
    policy: list[str] = opt([], POLICY)
    allocation: list[str] = opt([], ALLOCATION)
    profile: Optional[str] = opt(None, PROFILE)
    tokens: int = opt(8192, "Input tokens to score, in whole blocks (8192 = 8 blocks of 1024; --tokens 1001 --seq-len 1001 = the study's 1000 predicted tokens).", lo=2, hi=MAX_TOKENS)
    seq_len: int = opt(1024, "Tokens per block.", lo=2, hi=MAX_TOKENS)
    device: str = opt("cpu", DEVICE)
    dtype: Optional[str] = opt(None, DTYPE, choices=DTYPES)
    out: str = opt("results/evaluate.jsonl", "Results file; one JSON line is appended per evaluation.")
    mode: str = opt("masked", "masked (blocks, masked forward) or streaming (one stream through the real evicting cache).", choices=("masked", "streaming"))
    attention: str = opt("auto", ATTENTION, choices=BACKENDS)
    reindex: bool = opt(False, "Streaming: StreamingLLM position re-indexing.")
    chunk: int = opt(1, "Streaming: tokens per forward (1 = token by token; any chunk computes the same).", lo=1, hi=MAX_TOKENS)
    segment: int = opt(2048, "Streaming: report PPL per segment of this many tokens.", lo=1, hi=MAX_TOKENS)

    def check(self) -> None:
        if self.reindex and self.mode != "streaming":
            raise ConfigError("--reindex applies to --mode streaming (the masked evaluator keeps true positions)")
        if self.mode == "masked":
            check_blocks(self.tokens, self.seq_len)


@dataclass
class ClassifyConfig:
    model: str = opt("smollm2-135m", MODEL)
    corpus: str = opt("austen", CORPUS)
    encoding: Optional[str] = opt(None, ENCODING)
    split: str = opt("train", "Corpus split for the attention maps.", choices=("eval", "train", "test"))
    tokens: int = opt(4096, "Tokens of attention maps (4096 = 4 blocks of 1024).", lo=2, hi=MAX_TOKENS)
    seq_len: int = opt(1024, "Tokens per block for the attention maps.", lo=2, hi=MAX_TOKENS)
    tau: float = opt(0.2, "Attention mass a head may lose and still fit its window.", lo=0.0, hi=1.0)
    gqa: str = opt("max", "How query heads combine per KV head.", choices=("max", "mean"))
    sensitivity: bool = opt(True, "Measure each KV head's sensitivity and the Spearman check.")
    sens_tokens: int = opt(512, "Tokens for the sensitivity check.", lo=2, hi=MAX_TOKENS)
    sens_seq_len: int = opt(256, "Block length for the sensitivity check.", lo=2, hi=MAX_TOKENS)
    sens_window: int = opt(16, "Window a head is cut to in the sensitivity check (sink 4).", lo=1, hi=MAX_TOKENS)
    device: str = opt("cpu", DEVICE)
    dtype: Optional[str] = opt(None, DTYPE, choices=DTYPES)
    out: str = opt("results/profile.json", "Profile JSON to write.")

    def check(self) -> None:
        check_blocks(self.tokens, self.seq_len)


@dataclass
class SweepConfig:
    model: str = opt("smollm2-135m", MODEL)
    corpus: str = opt("austen", CORPUS)
    encoding: Optional[str] = opt(None, ENCODING)
    split: str = opt("eval", "Corpus split.", choices=("eval", "train", "test"))
    tokens: int = opt(4096, "Input tokens per configuration.", lo=2, hi=MAX_TOKENS)
    seq_len: int = opt(1024, "Tokens per block.", lo=2, hi=MAX_TOKENS)
    profile: str = opt("results/profile.json", "Head profile JSON, read when the grid has G/I/J/K names.")
    device: str = opt("cpu", DEVICE)
    dtype: Optional[str] = opt(None, DTYPE, choices=DTYPES)
    out: str = opt("results/ablation.jsonl", "Results JSONL (resumable).")
    grid: dict = opt({"full": None}, "Policy-name templates and their values (YAML only).")
    attention: str = opt("auto", ATTENTION, choices=BACKENDS)
    allocation: list[str] = opt([], "Allocation JSON file to add to the grid's rows. Repeatable.")
    controls: list[str] = opt([], "Also measure these controls of each allocation file, at its Eff.Ctx: "
                              "shuffled (windows permuted across heads), layer_mean. Repeatable.")

    def check(self) -> None:
        from headkv.alloc.policies import CONTROLS

        bad = [c for c in self.controls if c not in CONTROLS]
        if bad:
            raise ConfigError(f"--controls must be among {', '.join(CONTROLS)}, got {bad[0]!r}")
        if self.controls and not self.allocation:
            raise ConfigError("--controls are controls of allocation files: give --allocation FILE too")
        check_blocks(self.tokens, self.seq_len)


@dataclass
class PlotConfig:
    results: list[str] = opt([], "Results JSONL written by `headkv sweep` or `headkv passkey` (or a search.json); "
                             "several sweep files (one text at one length each) draw the coverage figure.",
                             arg=True)
    out: str = opt("results/figures", "Folder for the PNG figures.", flag="-o")


@dataclass
class ExportConfig:
    checkpoint: str = opt("", "Training checkpoint or run directory of `headkv train`.", arg=True)
    budget: Optional[float] = opt(None, "Average Eff.Ctx to export at (default: the training budget).", lo=1.0, hi=MAX_TOKENS)
    out: str = opt("", "Allocation JSON to write (required).", flag="-o")
    model: Optional[str] = opt(None, "Also check the checkpoint against this model.")

    def check(self) -> None:
        if not self.out:
            raise ConfigError("--out FILE is required")


@dataclass
class QuantizeConfig:
    allocation: str = opt("", "Allocation JSON file to quantize.", arg=True)
    classes: int = opt(2, "Distinct (sink, window) classes to keep (serving engines run a few window groups).", lo=1, hi=4)
    out: str = opt("", "Allocation JSON to write (required).", flag="-o")

    def check(self) -> None:
        if not self.allocation:
            raise ConfigError("give the allocation: headkv quantize ALLOCATION --classes K -o FILE")
        if not self.out:
            raise ConfigError("--out FILE is required")


_FILL = Fill()  # the fill rule's defaults, defined once (models.dynamic)


@dataclass
class FillConfig:
    allocation: str = opt("", "Allocation JSON whose per-head budgets (sink + window) are filled by content.",
                          arg=True)
    recent: int = opt(_FILL.recent, "Recency floor: the last keys every head always holds (its own included).", lo=1,
                      hi=MAX_TOKENS)
    chunk: int = opt(_FILL.chunk, "The held keys are re-chosen once every this many tokens.", lo=1, hi=MAX_TOKENS)
    decay: float = opt(_FILL.decay, "Score memory: every chunk, each key's accumulated attention is multiplied by it "
                       "(1: H2O's sum; 0: the last chunk only).", lo=0.0, hi=1.0)
    out: str = opt("", "Allocation JSON to write (required).", flag="-o")

    def check(self) -> None:
        if not self.allocation:
            raise ConfigError("give the allocation: headkv fill ALLOCATION -o FILE")
        if not self.out:
            raise ConfigError("--out FILE is required")


@dataclass
class GenerateConfig:
    model: str = opt("smollm2-135m", MODEL)
    allocation: Optional[str] = opt(None, "Allocation JSON file (fixed, learned or quantized).")
    policy: Optional[str] = opt(None, "Policy name, e.g. B_streaming_128, or full.")
    profile: Optional[str] = opt(None, PROFILE)
    prompt: Optional[str] = opt(None, "Text to continue.")
    prompts: Optional[str] = opt(None, "JSON-lines file of prompts (one {\"prompt\": ...} object per line).")
    batch_size: int = opt(1, "Prompts per batch (left-padded) with --prompts.", lo=1, hi=10**5)
    out: Optional[str] = opt(None, "With --prompts: JSON-lines file, one row per prompt (text, tokens, KV bytes, tokens/s).")
    max_new_tokens: int = opt(48, "Tokens to generate greedily.", lo=1, hi=MAX_TOKENS)
    reindex: bool = opt(False, "StreamingLLM position re-indexing: lets prompts run past the model's context.")
    static: bool = opt(False, "Fixed-capacity cache, decode steps replayed as a CUDA graph on a GPU (prompts of one batch of equal length).")
    device: str = opt("cpu", DEVICE)
    dtype: Optional[str] = opt(None, DTYPE, choices=DTYPES)

    def check(self) -> None:
        if self.static and self.reindex:
            raise ConfigError("--static and --reindex do not combine (the static cache keeps true positions)")
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("give --prompt TEXT or --prompts FILE (exactly one)")
        if self.prompt is not None and not self.prompt:
            raise ConfigError("--prompt is empty")
        if self.prompts is not None and not self.out:
            raise ConfigError("--prompts needs --out FILE for the rows")
        if (self.policy is None) == (self.allocation is None):
            raise ConfigError("give exactly one of --allocation FILE or --policy NAME (full = full attention)")


@dataclass
class PasskeyConfig:
    model: str = opt("smollm2-135m", MODEL)
    corpus: str = opt("austen", "Filler text source.")
    encoding: Optional[str] = opt(None, ENCODING)
    split: str = opt("eval", "Corpus split for the filler.", choices=("eval", "train", "test"))
    policy: list[str] = opt([], POLICY)
    allocation: list[str] = opt([], ALLOCATION)
    profile: Optional[str] = opt(None, PROFILE)
    length: list[int] = opt([512, 1024, 2048], "Prompt length in tokens. Repeatable.", lo=64, hi=MAX_TOKENS)
    depth: list[float] = opt([0.0, 0.25, 0.5, 0.75, 1.0], "Needle depth in [0, 1]. Repeatable.", lo=0.0, hi=1.0)
    trials: int = opt(5, "Tasks per (length, depth) cell.", lo=1, hi=10**6)
    seed: int = opt(0, "Seed of the task generator.", lo=0, hi=2**32 - 1)
    batch: int = opt(8, "Tasks per forward.", lo=1, hi=10**6)
    device: str = opt("cpu", DEVICE)
    dtype: Optional[str] = opt(None, DTYPE, choices=DTYPES)
    out: str = opt("results/evaluate.jsonl", "Results file; one JSON line per (allocation, length, depth).")
    plots: str = opt("results/plots", "Folder for the accuracy heatmaps.")


class TrainError(HeadkvError):
    """A training run or checkpoint that cannot be used as asked, said in one line."""


@dataclass
class TrainConfig:
    """Every option of a training run (the keys of configs/train.yaml)."""

    model: str = opt("smollm2-135m", "Hub name, local model directory, or smollm2-135m.")
    corpus: str = opt("austen", "Training text (its TRAIN split only): austen, a .txt file or folder.")
    encoding: Optional[str] = opt(None, "Text encoding of a local corpus (default strict UTF-8).")
    budget: Optional[float] = opt(None, "Average Eff.Ctx (sink + mean window) to learn under (required).")
    sink: int = opt(4, "Fixed sink tokens of every head (the start of learned ones).", lo=0, hi=10**6)
    sink_max: int = opt(0, "Learn each head's sinks too, in [0, sink_max], counted in Eff.Ctx (0: fixed).",
                        lo=0, hi=10**6)
    seq_len: int = opt(1024, "Tokens per training block; also the largest window.", lo=2, hi=10**7)
    batch_size: int = opt(1, "Blocks per device per step.", lo=1, hi=10**6)
    max_steps: int = opt(100, "Optimizer steps.", lo=1, hi=10**8)
    lr: float = opt(0.05, "Adam learning rate on the gate logits.")
    lr_schedule: str = opt("cosine", "const or cosine (decays to lr_end_frac x lr at the last step).")
    lr_end_frac: float = opt(0.1, "Cosine schedule: the last step's lr as a fraction of lr.")
    tau_start: float = opt(8.0, "Soft-edge temperature at the first step.")
    tau_end: float = opt(2.0, "Soft-edge temperature at the last step (the export is hard either way).")
    tau_schedule: str = opt("exp", "exp, linear or const.")
    edge: str = opt("linear", "The soft window's edge: linear (tau in tokens) or log (tau in log-distance, "
                    "below 1; a key far beyond a window still moves it; not with sink_max).")
    objective: str = opt("kl", "kl (distil full attention; the default, see the README), ce (language-model "
                         "loss) or mix (their mean).")
    init: Optional[str] = opt(None, "Warm start: an allocation JSON whose windows start the gates (default: "
                              "StreamingLLM at the budget).")
    n_blocks: int = opt(0, "Training blocks; 0 = max_steps x global batch.", lo=0, hi=10**8)
    passkey_mix: float = opt(0.0, "Fraction of training blocks replaced by synthetic passkey blocks (train-split "
                             "filler; the question is followed by its answer).")
    val_blocks: int = opt(4, "Held-out TRAIN-split blocks for evaluation; 0 = none.", lo=0, hi=10**6)
    eval_every: int = opt(25, "Steps between hard-export evaluations (and heatmaps).")
    log_every: int = opt(5, "Steps between logged metrics.")
    ckpt_every: int = opt(25, "Steps between checkpoints.")
    dtype: str = opt("float32", "The frozen model's dtype: float32, bfloat16 or float16 (gates: float32).")
    attention: str = opt("auto", ATTENTION + " Training on CPU always takes the dense soft bias (flex has no "
                         "backward there).", choices=BACKENDS)
    precision: str = opt("32-true", "Lightning precision, e.g. 32-true or bf16-mixed.")
    accelerator: str = opt("cpu", "Lightning accelerator: cpu, gpu or auto.")
    devices: int = opt(1, "Processes/devices (2 on CPU = DDP over gloo).")
    strategy: str = opt("auto", "Lightning strategy: auto, ddp, ...")
    seed: int = opt(0, "Seed for block order and initialisation.", lo=0, hi=2**32 - 1)
    threads: int = opt(0, "torch threads per process (0 = torch's choice).", lo=0, hi=4096)
    wandb_mode: str = opt("auto", "auto (online with WANDB_API_KEY), online, offline, disabled.")
    wandb_project: str = opt("headkv", "wandb project name.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown config key(s): {', '.join(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.budget is None:
            raise TrainError("missing config key 'budget' (pass --budget or set it in the config)")
        for f in fields(self):  # the annotations are strings here (postponed evaluation)
            value, key = getattr(self, f.name), f.name
            if key == "precision":  # Lightning also takes 32, 16, ...
                ok, want = isinstance(value, (str, int)) and not isinstance(value, bool), "a string"
            elif f.type == "str":
                kinds = (str, os.PathLike) if key in ("model", "corpus") else str
                ok, want = isinstance(value, kinds), "a string"
            elif f.type == "Optional[str]":
                ok, want = value is None or isinstance(value, str), "a string"
            elif f.type == "int":
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
            else:  # float or float | None (budget, checked above): an int is a float too
                ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            if not ok:
                raise TrainError(f"{key} must be {want}, got {value!r}")
        choices = {
            "tau_schedule": ("exp", "linear", "const"),
            "edge": ("linear", "log"),
            "lr_schedule": ("const", "cosine"),
            "objective": OBJECTIVES,
            "wandb_mode": ("auto", "online", "offline", "disabled"),
            "dtype": ("float32", "bfloat16", "float16"),
            "attention": BACKENDS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TrainError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in ("seq_len", "batch_size", "max_steps", "devices", "eval_every", "log_every", "ckpt_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise TrainError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not (self.tau_start > 0 and self.tau_end > 0 and self.lr > 0):
            raise TrainError("tau_start, tau_end and lr must be positive")
        if self.edge == "log" and not (self.tau_start < 1 and self.tau_end < 1):
            raise TrainError(f"the log edge needs tau_start and tau_end below 1 (log-distance), got "
                             f"{self.tau_start:g} and {self.tau_end:g}")
        if self.edge == "log" and self.sink_max:
            raise TrainError("the log edge is for windows only: learned sinks (sink_max) keep the linear edge, "
                             "whose tau is in tokens; use one or the other")
        if not 0 <= self.passkey_mix <= 1:
            raise TrainError(f"passkey_mix must lie in [0, 1], got {self.passkey_mix!r}")
        if not 0 <= self.lr_end_frac <= 1:
            raise TrainError(f"lr_end_frac must lie in [0, 1], got {self.lr_end_frac!r}")
        if not self.wandb_project:
            raise TrainError("wandb_project must not be empty")
        for key, allowed in _lightning_names().items():
            if str(getattr(self, key)) not in allowed:
                raise TrainError(f"{key} must be one of {', '.join(sorted(allowed))}, got {getattr(self, key)!r}")
        from headkv.alloc.gates import GateError, check_budget

        try:
            check_budget(float(self.budget), self.sink, self.seq_len)
        except GateError as e:
            raise TrainError(str(e)) from None
        if self.sink_max and not self.sink <= self.sink_max < self.budget:
            raise TrainError(f"sink_max must lie in [sink, budget), got {self.sink_max} (sink {self.sink}, "
                             f"budget {self.budget:g})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def _lightning_names() -> dict[str, set[str]]:
    """What Lightning accepts for precision, accelerator and strategy (read off its registries)."""
    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    precisions = {str(v) for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal)}
    return {"precision": precisions,
            "accelerator": {"auto", "gpu", *AcceleratorRegistry.available_accelerators()},
            "strategy": {"auto", *StrategyRegistry.available_strategies()}}


def check_blocks(tokens: int, seq_len: int) -> None:
    """Blocks are whole: refuse ``tokens`` below one block of ``seq_len`` rather than change either."""
    if tokens < seq_len:
        raise ConfigError(f"--tokens must be at least --seq-len (got {tokens} and {seq_len}): the tokens are "
                          "scored in whole blocks; for one block of N tokens give --tokens N --seq-len N")


# ---- loading: defaults < YAML < flags, every value type-checked -------------------------------------------
def _typed(name: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (from a YAML file or a flag), or one ConfigError line."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        return None if value is None else _typed(name, value, args[0])
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_typed(name, v, args[0]) for v in items]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
        dict: isinstance(value, dict),
    }[origin or tp]
    if not ok:
        raise ConfigError(f"'{name}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"'{name}' must be a finite number, got {value!r}")
    return tp(value) if tp in (int, float, str) else value


def _check_rules(name: str, value: Any, meta: dict[str, Any]) -> None:
    if value == [] and "lo" in meta:  # a list of numbers (lengths, depths) needs one at least
        raise ConfigError(f"--{name.replace('_', '-')} needs at least one value")
    for v in value if isinstance(value, list) else [value]:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(meta['choices'])}, got {v!r}")
        if "lo" in meta and not meta["lo"] <= v <= meta.get("hi", math.inf):
            hi = meta.get("hi")
            rng = f"between {meta['lo']} and {hi}" if hi is not None else f"at least {meta['lo']}"
            raise ConfigError(f"--{name.replace('_', '-')} must be {rng}, got {v!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of option names to values, or one ConfigError line."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"config {path} is not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of option names to values")
    return data


def load(cls: type, config: str | Path | None, given: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
    """``cls`` from its defaults (or ``base``), then the YAML ``config``, then the flags ``given`` (None = not
    given); every key and value checked, then ``cls.check()``."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = dict(base or {})
    if config is not None:
        data = read_yaml(config)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"config {config}: unknown key(s) {', '.join(map(str, unknown))}")
        values.update(data)
    values.update({k: v for k, v in given.items() if v is not None and v != [] and k in known})
    for name, value in values.items():
        values[name] = _typed(name, value, hints[name])
        _check_rules(name, values[name], dict(known[name].metadata))
    cfg = cls(**values)
    for check in ("check", "validate"):
        if hasattr(cfg, check):
            getattr(cfg, check)()
    return cfg


# ---- checks that need the world: devices, output paths ------------------------------------------------
def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here")


def check_output(path: str | Path, *, directory: bool = False, inputs: Any = (),
                 own: tuple[str, Callable[[Path], Any]] | None = None) -> None:
    """Fail now, with one line, if ``path`` (a file, or a folder) cannot be written later: its folders are
    made and a probe file written and removed; folders made only for the probe are removed again. An
    existing file must be a regular, writable file that is none of the command's ``inputs`` and, given
    ``own = (what, read)``, is empty or ``what`` (``read(path)`` raises a HeadkvError if it is not): an
    output never replaces or truncates what it was not written by this command."""
    path = Path(path)
    if not directory and str(path) in ("", "."):
        raise ConfigError("an output path is empty")
    if path.exists() and path.is_dir() != directory:
        kind = "a folder" if path.is_dir() else "a file"
        raise ConfigError(f"output {path} is {kind}; expected {'a folder' if directory else 'a file'}")
    if path.exists() and not directory:
        if not path.is_file():
            raise ConfigError(f"output {path} is not a regular file (a device or pipe); give a file path")
        if any(Path(p).exists() and os.path.samefile(path, p) for p in inputs):
            raise ConfigError(f"output {path} is also an input of this command; give another output file")
        if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:
            raise ConfigError(f"output {path} is read-only")
        if own is not None and path.stat().st_size:
            try:
                own[1](path)
            except HeadkvError:
                raise ConfigError(f"output {path} exists and is not {own[0]}; give another output file "
                                  "(it is left as it is)") from None
    folder = path if directory else path.parent
    made: list[Path] = []
    probe = folder / f".headkv-probe-{os.getpid()}"
    try:
        for p in [*reversed(folder.parents), folder]:
            if not p.exists():
                p.mkdir()
                made.append(p)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output {path} cannot be written: {e.strerror or e}") from None
    finally:
        for p in reversed(made):
            p.rmdir()


INPUTS = ("allocation", "profile", "corpus", "prompts", "checkpoint")  # the options that name input files


def check_out(cfg: Any, own: str | tuple[str, Callable[[Path], Any]]) -> None:
    """``check_output(cfg.out)`` for a command: not one of its input files, and an existing file only when it is
    ``own``'s kind (results rows, generate rows, an allocation; or ``(what, read)``), so nothing else is lost."""
    from headkv.alloc.allocation import Allocation
    from headkv.alloc.results import check_results

    kinds = {"results": ("a headkv results file", check_results),
             "generate": ("a file of `headkv generate` rows", lambda p: check_results(p, ("generate",))),
             "allocation": ("an allocation file", Allocation.load)}
    names = [getattr(cfg, k, None) for k in INPUTS]
    inputs = [p for v in names if v for p in (v if isinstance(v, list) else [v])]
    check_output(cfg.out, inputs=inputs, own=kinds[own] if isinstance(own, str) else own)


@dataclass
class SearchConfig:
    """`headkv search`: the smallest average budget whose learned allocation keeps perplexity within
    ``max_ppl_increase`` of full attention's on the eval split (alloc/search.py)."""

    model: str = opt("smollm2-135m", MODEL)
    corpus: str = opt("austen", CORPUS + " Probes train on its TRAIN split; the target is met on its EVAL split.")
    encoding: Optional[str] = opt(None, ENCODING)
    seq_len: int = opt(1024, "Tokens per block, in training and evaluation; KV bytes are counted at this length.",
                       lo=2, hi=MAX_TOKENS)
    max_ppl_increase: float = opt(0.02, "Largest relative perplexity increase over full attention on the eval split "
                                  "(0.02: PPL <= 1.02 x full attention's).")
    budget_min: int = opt(16, "Smallest average budget (Eff.Ctx) considered; probed second.", lo=1, hi=MAX_TOKENS)
    budget_max: int = opt(512, "Largest average budget considered; probed first, it must meet the target.",
                          lo=1, hi=MAX_TOKENS)
    tolerance: float = opt(0.1, "Bisection stop: the passing budget within 1 + tolerance of the failing one "
                           "(or next to it).", lo=0.0, hi=100.0)
    n_blocks: int = opt(8, "Eval-split blocks of --seq-len tokens scored per probe (8 x 1024 = `headkv evaluate`'s "
                        "8192 tokens).", lo=1, hi=10**6)
    train_config: Optional[str] = opt(None, "Train YAML (TrainConfig keys) of every probe (default configs/train.yaml "
                                      "where it exists); the search sets budget, init, model, corpus, encoding, "
                                      "seq_len, seed, threads and wandb_mode over it (and max_steps, objective when given).")
    max_steps: Optional[int] = opt(None, "Training steps per probe (default: the train config's).", lo=1, hi=10**8)
    objective: Optional[str] = opt(None, "Training objective of every probe (default: the train config's).",
                                   choices=OBJECTIVES)
    seed: int = opt(0, "Training seed of every probe.", lo=0, hi=2**32 - 1)
    threads: int = opt(0, "torch threads (0 = torch's choice).", lo=0, hi=4096)
    wandb_mode: str = opt("disabled", "wandb logging of each probe's training.",
                          choices=("auto", "online", "offline", "disabled"))
    device: str = opt("cpu", "Evaluation device: " + DEVICE + " Training runs on the train config's accelerator.")
    dtype: Optional[str] = opt(None, "Evaluation dtype: " + DTYPE + " Training uses the train config's dtype.",
                               choices=DTYPES)
    attention: str = opt("auto", ATTENTION, choices=BACKENDS)
    out_dir: Optional[str] = opt(None, "Search folder (default runs/search-<model>-<corpus>-<seq_len>-<increase>): "
                                 "search.json, allocation.json, search.png and probes/b<B>/ (resumable).")

    def check(self) -> None:
        if not self.max_ppl_increase > 0:
            raise ConfigError(f"--max-ppl-increase must be > 0 (a relative increase: 0.02 = 2%), "
                              f"got {self.max_ppl_increase:g}")
        if self.budget_min >= self.budget_max:
            raise ConfigError(f"--budget-min ({self.budget_min}) must be below --budget-max ({self.budget_max})")
