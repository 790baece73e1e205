"""The contract for bad input, as a table: every command, option, config key and input file.

Each case runs ``headkv ARGS`` in process on a tiny random Llama saved with the offline default's tokenizer
and must end with exactly one stderr line starting ``error:``, exit code 2, no traceback, and no file left
behind that was not there before (no partial output, no stray folder, no temp file). A crafted pickle passed
as a checkpoint must not run. ``{m}`` is the tiny model folder, ``{t}`` its text corpus, ``{d}`` the case's
own empty folder, and ``{f:NAME}`` one of the prepared bad files below.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from tests.test_coverage import sweep_lines
from tests.test_passkey import cli_run, make_tiny_dir

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "headkv-contract-pwned"


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _files(root: Path, model_dir: Path) -> dict[str, Path]:
    """Bad input files, one per way a file can be wrong."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    shape = [cfg.num_hidden_layers, cfg.num_key_value_heads]
    good = {"format_version": 1, "model_id": "", "shape": shape, "q_per_kv": 2, "meta": {},
            "sink": [[4] * shape[1]] * shape[0], "window": [[8] * shape[1]] * shape[0]}
    texts = {
        "alloc_json": "{not json",
        "alloc_list": "[1, 2]",
        "alloc_version": json.dumps({**good, "format_version": 9}),
        "alloc_shape": json.dumps({**good, "shape": [5, 7]}),
        "alloc_other_model": json.dumps({**good, "shape": [shape[0], 1], "sink": [[4]] * shape[0],
                                         "window": [[8]] * shape[0]}),
        "alloc_negative": json.dumps({**good, "sink": [[-1] * shape[1]] * shape[0]}),
        "alloc_zero_window": json.dumps({**good, "window": [[0] * shape[1]] * shape[0]}),
        "alloc_float": json.dumps({**good, "window": [[8.5] * shape[1]] * shape[0]}),
        "alloc_missing": json.dumps({k: v for k, v in good.items() if k != "window"}),
        "alloc_ragged": json.dumps({**good, "window": [[8] * shape[1], [8]]}),
        "alloc_q_per_kv": json.dumps({**good, "q_per_kv": 3}),
        "alloc_native": json.dumps({**good, "native": [512, "x"]}),
        "alloc_native_len": json.dumps({**good, "native": [512] * (shape[0] + 1)}),
        "yaml_attention": "attention: sparse\n",
        "profile_json": "][",
        "profile_other": json.dumps({"format_version": 1, "shape": [9, 9], "labels": [], "confidence": []}),
        "results_garbage": '{"kind": "sweep", "name": "x"}\nthis is not json\n',
        "results_no_name": '{"kind": "sweep", "ppl": 3}\n',
        "results_list": "[1, 2, 3]\n",
        "results_empty": "",
        "results_no_rows": '{"kind": "evaluate", "name": "full"}\n',
        "yaml_bad": "tokens: [1, 2\n",
        "yaml_list": "- 1\n- 2\n",
        "yaml_unknown": "tokenz: 12\n",
        "yaml_type": "tokens: many\n",
        "yaml_float_int": "seq_len: 64.5\n",
        "yaml_bool_int": "tokens: true\n",
        "yaml_negative": "tokens: -4\n",
        "yaml_str_list": "policy: {a: 1}\n",
        "yaml_dtype": "dtype: int8\n",
        "grid_not_map": "grid: [full]\n",
        "grid_missing": "grid: {\"A_window_{W}\": null}\n",
        "grid_unknown": "grid: {Z_nope_1: null}\n",
        "grid_empty": "grid: {}\n",
        "grid_ok": "grid: {full: null, \"B_streaming_{C}\": {C: [8, 16]}}\n",
        "train_yaml_bad": "lr: fast\n",
        "ckpt_text": "not a checkpoint at all",
        "ckpt_empty": "",
        "prompts_bad": "{\"prompt\": \"a\"}\nnot json\n",
        "prompts_no_key": "{\"text\": \"a\"}\n",
        "prompts_empty_prompt": "{\"prompt\": \"hello\"}\n{\"prompt\": \"\"}\n",
        "prompts_long": json.dumps({"prompt": " the" * 600}) + "\n",
        "prompts_ok": "{\"prompt\": \"hello\"}\n",
        "prompts_unequal": "{\"prompt\": \"hello\"}\n{\"prompt\": \"hello there, my friend\"}\n",
        "search_malformed": json.dumps({"kind": "search", "settings": {}, "full": {"ppl": 9.0},
                                        "target_ppl": 9.2, "curve": 3}),
        "train_yaml_ddp": "devices: 2\n",
        # beyond int64, and a sink + window that reaches 2**63
        "alloc_huge": json.dumps({**good, "window": [[10**23] * shape[1]] * shape[0]}),
        "alloc_sum_2_63": json.dumps({**good, "sink": [[2**62] * shape[1]] * shape[0],
                                      "window": [[2**62] * shape[1]] * shape[0]}),
        "alloc_meta_list": json.dumps({**good, "meta": [1, 2]}),
        "alloc_deep": "[" * 100_000 + "]" * 100_000,
        "alloc_good": json.dumps(good),
        "results_deep": '{"kind": "sweep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        "profile_ok": json.dumps({"format_version": 1, "labels": [["mixed"] * shape[1]] * shape[0],
                                  "confidence": [[0.1] * shape[1]] * shape[0], "q_per_kv": 2}),
        "yaml_escape": '"\\e]0;pwned\\atokenz": 1\n',  # a terminal escape code (a title) in a key
        "yaml_deep": "a: " + "[" * 100_000 + "\n",
        "yaml_length_empty": "length: []\n",
        "grid_int_key": "grid: {64: null}\n",
        "grid_brace": "grid: {\"B_streaming_{\": null}\n",
        "grid_values_list": "grid: {\"B_streaming_{C}\": [8, 16]}\n",
        "notes": "first note\nlast note, no newline",  # outputs of another kind: never replaced or truncated
        "one_line": "one line, no newline",
        "results_ok": '{"kind": "evaluate", "name": "full"}\n',
        # sweeps for the coverage figure (`headkv plot A B ...`): good ones, and each way one can lack it
        "cov_austen": sweep_lines("austen", 1024),
        "cov_austen_again": sweep_lines("austen", 1024),
        "cov_pydoc": sweep_lines("pydoc", 1024),
        "cov_no_alloc": sweep_lines("pydoc", 1024, learned=False),
        "cov_one_b": sweep_lines("pydoc", 1024, b=(64,)),
        "cov_one": sweep_lines("austen", 1024, one_coverage=True),
        "cov_one_pydoc": sweep_lines("pydoc", 4096, one_coverage=True),
        "cov_two_lengths": sweep_lines("pydoc", 1024) + sweep_lines("pydoc", 4096),
    }
    out = {}
    for name, text in texts.items():
        out[name] = root / f"{name}.{'yaml' if 'yaml' in name or 'grid' in name else 'json'}"
        out[name].write_text(text)
    out["binary"] = root / "binary.json"
    out["binary"].write_bytes(b"\xff\xfe\x00garbage\x81")
    out["latin1"] = root / "latin1.txt"
    out["latin1"].write_bytes("Caf\xe9 au lait, d\xe9j\xe0 vu.\n\n".encode("latin-1") * 200)
    out["ckpt_pickle"] = root / "pwn.ckpt"
    out["ckpt_pickle"].write_bytes(pickle.dumps({"state_dict": _Pwn()}))
    out["empty_dir"] = root / "empty_dir"
    out["empty_dir"].mkdir()
    out["a_file"] = root / "a_file.txt"
    out["a_file"].write_text("x")
    out["gpt2_dir"] = root / "gpt2_dir"  # a family the attention patch does not serve
    out["gpt2_dir"].mkdir()
    (out["gpt2_dir"] / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    out["search_dir"] = root / "search_dir"  # a search of other settings
    out["search_dir"].mkdir()
    other = {"kind": "search", "settings": {"seq_len": 1024}, "full": {"ppl": 9.0}, "target_ppl": 9.2,
             "curve": []}
    (out["search_dir"] / "search.json").write_text(json.dumps(other))
    out["search_bad_dir"] = root / "search_bad_dir"  # its search.json is not one
    out["search_bad_dir"].mkdir()
    (out["search_bad_dir"] / "search.json").write_text("[1]")
    out["readonly"] = root / "readonly.jsonl"  # results, but read-only: refused before the work
    out["readonly"].write_text('{"kind": "evaluate", "name": "full"}\n')
    out["readonly"].chmod(0o444)
    out["fifo"] = root / "fifo"  # a pipe as output or corpus would block: refused
    os.mkfifo(out["fifo"])
    out["model_pickle"] = root / "model_pickle"  # weights as a pickle: refused unread, in one line
    shutil.copytree(model_dir, out["model_pickle"], ignore=shutil.ignore_patterns("*.safetensors"))
    (out["model_pickle"] / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Pwn()}))
    return out


E = "evaluate --model {m} --corpus {t} --tokens 64 --seq-len 32"
P = "passkey --model {m} --corpus {t} --length 128 --depth 0.5 --trials 1"
G = "generate --model {m} --prompt hello --max-new-tokens 2"
T = "train --model {m} --corpus {t} --seq-len 32 --max-steps 1 --wandb-mode disabled"
S = "search --model {m} --corpus {t} --seq-len 64 --budget-min 8 --budget-max 32 --max-steps 1"
CASES = [
    # ---- the option parser -----------------------------------------------------------------------------
    ("nope", "No such command"),
    ("evaluate --nope 1", "No such option"),
    ("evaluate --tokens", "requires an argument"),
    ("evaluate --tokens abc", "valid integer"),
    ("evaluate --tokens 1.5", "valid integer"),
    ("evaluate --seq-len ''", "valid integer"),
    ("classify --tau x", "valid number"),
    ("evaluate extra-positional", "unexpected extra argument"),
    ("export a b", "unexpected extra argument"),
    ("export --budget x", "valid number"),
    ("passkey --depth half", "valid number"),
    ("train --budget", "requires an argument"),
    # ---- evaluate: ranges and names ---------------------------------------------------------------------
    (E + " --tokens 0", "--tokens must be between"),
    (E + " --tokens -5", "--tokens must be between"),
    (E + " --tokens 1000000000000000000000000000000", "--tokens must be between"),
    (E + " --seq-len 1", "--seq-len must be between"),
    (E + " --tokens 100000 --seq-len 100000", "exceeds the model's 512 positions"),
    ("evaluate --model {f:gpt2_dir} --tokens 64 --seq-len 32", "model family 'gpt2' is not supported"),
    ("train --model {f:gpt2_dir} --budget 8 --max-steps 1 --wandb-mode disabled",
     "model family 'gpt2' is not supported"),
    (E + " --dtype float8", "--dtype must be one of"),
    (E + " --attention sparse", "--attention must be one of"),
    (E + " --attention ''", "--attention must be one of"),
    (E + " --config {f:yaml_attention}", "attention must be one of"),
    (E + " --allocation {f:alloc_native}", "'native' must be a list of per-layer integers"),
    (E + " --allocation {f:alloc_native_len}", "'native' must hold one non-negative integer per layer"),
    ("sweep {f:grid_ok} --model {m} --corpus {t} --seq-len 64 --attention flexx",
     "--attention must be one of"),
    ("sweep {f:grid_ok} --model {m} --corpus {t} --seq-len 64 --controls reversed",
     "--controls must be among"),
    (T + " --budget 8 --attention none", "attention must be one of"),
    (E + " --dtype ''", "--dtype must be one of"),
    (E + " --device tpu", "not a device name"),
    (E + " --device cuda", "no CUDA device"),
    (E + " --device cuda:x", "not a device name"),
    (E + " --mode fast", "--mode must be one of"),
    (E + " --reindex", "--reindex applies to --mode streaming"),
    (E + " --mode streaming --chunk 0", "--chunk must be between"),
    (E + " --mode streaming --segment 0", "--segment must be between"),
    (E + " --split dev", "--split must be one of"),
    (E + " --policy Z_nope_1", "unknown policy"),
    (E + " --policy B_streaming_2", "must exceed the 4 sink tokens"),
    (E + " --policy G_conf0.5_base8", "needs a head profile"),
    (E + " --policy G_conf0.5_base8 --profile {f:profile_json}", "not valid JSON"),
    (E + " --policy G_conf0.5_base8 --profile {d}/none.json", "cannot read head profile"),
    (E + " --policy G_conf0.5_base8 --profile {f:profile_other}", "head profile"),
    (E + " --policy G_conf0.5_base8 --profile {f:binary}", "not UTF-8 text"),
    (E + " --out {f:empty_dir}", "is a folder"),
    (E + " --out {f:a_file}/x.jsonl", "cannot be written"),
    (E + " --model {d}/no-model", "model"),
    (E + " --model {f:empty_dir}", "model"),
    (E + " --corpus {d}/missing.txt", "corpus path not found"),
    (E + " --corpus {f:empty_dir}", "no .txt files"),
    (E + " --corpus {f:latin1}", "not valid utf-8"),
    (E + " --corpus {f:latin1} --encoding no-such-codec", "unknown text encoding"),
    (E + " --corpus {t} --tokens 10000000", "tokens"),
    # ---- allocation files (every command that takes them) ----------------------------------------------
    (E + " --allocation {d}/missing.json", "cannot read allocation file"),
    (E + " --allocation {f:alloc_json}", "not valid JSON"),
    (E + " --allocation {f:alloc_list}", "must hold a JSON object"),
    (E + " --allocation {f:alloc_version}", "format_version"),
    (E + " --allocation {f:alloc_shape}", "has shape"),
    (E + " --allocation {f:alloc_other_model}", "has shape"),
    (E + " --allocation {f:alloc_negative}", "negative value"),
    (E + " --allocation {f:alloc_zero_window}", "at least 1"),
    (E + " --allocation {f:alloc_float}", "non-integer"),
    (E + " --allocation {f:alloc_missing}", "lacks window"),
    (E + " --allocation {f:alloc_ragged}", "different lengths"),
    (E + " --allocation {f:alloc_q_per_kv}", "q_per_kv"),
    (E + " --allocation {f:binary}", "not UTF-8 text"),
    (E + " --allocation {f:empty_dir}", "cannot read allocation file"),
    (P + " --allocation {f:alloc_shape}", "has shape"),
    (G + " --allocation {f:alloc_json}", "not valid JSON"),
    ("sweep configs/learned.yaml --model {m} --corpus {t} --seq-len 64 --allocation {f:alloc_negative}",
     "negative value"),
    # ---- YAML configs --------------------------------------------------------------------------------------
    ("evaluate --config {d}/missing.yaml", "cannot read config"),
    ("evaluate --config {f:yaml_bad}", "not valid YAML"),
    ("evaluate --config {f:yaml_list}", "must be a mapping"),
    ("evaluate --config {f:yaml_unknown}", "unknown key(s) tokenz"),
    ("evaluate --config {f:yaml_type}", "'tokens' must be int"),
    ("evaluate --config {f:yaml_float_int}", "'seq_len' must be int"),
    ("evaluate --config {f:yaml_bool_int}", "'tokens' must be int"),
    ("evaluate --config {f:yaml_negative}", "--tokens must be between"),
    ("evaluate --config {f:yaml_str_list}", "'policy' must be str"),
    ("evaluate --config {f:yaml_dtype}", "--dtype must be one of"),
    ("evaluate --config {f:binary}", "not valid YAML"),
    ("classify --config {f:yaml_unknown}", "unknown key(s)"),
    ("passkey --config {f:yaml_unknown}", "unknown key(s)"),
    ("generate --config {f:yaml_unknown}", "unknown key(s)"),
    ("train --config {f:train_yaml_bad} --budget 16", "'lr' must be float"),
    ("train --config {f:yaml_unknown} --budget 16", "unknown key(s)"),
    # ---- classify ------------------------------------------------------------------------------------------
    ("classify --model {m} --corpus {t} --tau 2", "--tau must be between"),
    ("classify --model {m} --corpus {t} --gqa median", "--gqa must be one of"),
    ("classify --model {m} --corpus {t} --seq-len 8 --tokens 64", "--seq-len must exceed"),
    ("classify --model {m} --corpus {t} --tokens 32 --seq-len 64", "--tokens must be at least --seq-len"),
    ("classify --model {m} --corpus {t} --sens-window 0", "--sens-window must be between"),
    ("classify --model {m} --corpus {t} --sens-tokens 1", "--sens-tokens must be between"),
    ("classify --model {m} --corpus {f:latin1} --seq-len 256 --tokens 256", "not valid utf-8"),
    ("classify --model {m} --corpus {t} --out {f:empty_dir}", "is a folder"),
    ("classify --model {m} --corpus {t} --seq-len 256 --tokens 256 --sens-seq-len 4096", "positions"),
    # ---- sweep ---------------------------------------------------------------------------------------------
    ("sweep", "give the sweep's YAML config"),
    ("sweep {d}/missing.yaml", "cannot read config"),
    ("sweep --config {d}/missing.yaml", "cannot read config"),
    ("sweep {f:grid_not_map} --model {m}", "'grid' must be dict"),
    ("sweep {f:grid_missing} --model {m} --corpus {t}", "gives no values for W"),
    ("sweep {f:grid_unknown} --model {m} --corpus {t} --seq-len 64", "unknown policy"),
    ("sweep {f:grid_empty} --model {m} --corpus {t}", "'grid' must map"),
    ("sweep configs/ablation.yaml --model {m} --corpus {t} --seq-len 64 --profile {d}/none.json",
     "cannot read head profile"),
    ("sweep configs/learned.yaml --model {m} --corpus {t} --seq-len 64 --out {f:empty_dir}", "is a folder"),
    ("sweep configs/learned.yaml --model {m} --corpus {t} --tokens 0", "--tokens must be between"),
    ("sweep {f:grid_ok} --model {m} --corpus {f:latin1} --seq-len 64", "not valid utf-8"),
    ("sweep {f:grid_ok} --model {m} --corpus {t} --seq-len 64 --encoding nope", "unknown text encoding"),
    # ---- plot ----------------------------------------------------------------------------------------------
    ("plot", "give the results file"),
    ("plot {d}/missing.jsonl", "does not exist"),
    ("plot {f:empty_dir}", "does not exist"),
    ("plot {f:results_garbage}", "not a JSON row"),
    ("plot {f:results_no_name}", "lacks"),
    ("plot {f:results_list}", "must be a JSON object"),
    ("plot {f:results_empty}", "holds no sweep or passkey rows"),
    ("plot {f:results_no_rows}", "holds no sweep or passkey rows"),
    ("plot {f:binary}", "not a JSON row"),  # a last line without newline is a row, a torn row or refused
    ("plot {f:results_no_rows} -o {f:a_file}", "is a file"),
    # several files: the coverage figure, each file one sweep with its B frontier and allocation rows
    ("plot {f:cov_austen} {d}/missing.jsonl", "does not exist"),
    ("plot {f:cov_austen} {f:cov_pydoc} {f:empty_dir}", "does not exist"),
    ("plot {f:cov_austen} {f:cov_no_alloc}", "holds no rows of allocation files"),
    ("plot {f:cov_austen} {f:cov_one_b}", "has 1 B_streaming row(s)"),
    ("plot {f:cov_austen} {f:results_no_rows}", "holds no sweep rows"),
    ("plot {f:cov_austen} {f:results_garbage}", "not a JSON row"),
    ("plot {f:cov_austen} {f:cov_austen}", "is given twice"),
    ("plot {f:cov_austen} {f:cov_austen_again}", "are both austen at 1024 tokens"),
    ("plot {f:cov_one} {f:cov_one_pydoc}", "two or more coverages"),
    ("plot {f:cov_two_lengths} {f:cov_austen}", "several seq_len values"),
    ("plot {f:cov_austen} {f:search_dir}/search.json", "is a `headkv search` file"),
    ("plot {f:cov_austen} {f:cov_pydoc} -o {f:a_file}", "is a file"),
    ("plot --config {f:yaml_unknown}", "unknown key(s)"),
    # ---- train ---------------------------------------------------------------------------------------------
    (T, "missing config key 'budget'"),
    (T + " --budget 0", "infeasible"),
    (T + " --budget 5000", "infeasible"),
    (T + " --budget 16 --lr -1", "must be positive"),
    (T + " --budget 16 --lr nan", "finite"),
    (T + " --budget 16 --objective mse", "objective must be one of"),
    (T + " --budget 16 --dtype int8", "dtype must be one of"),
    (T + " --budget 16 --sink-max 16", "sink_max must lie in [sink, budget)"),
    (T + " --budget 16 --sink-max 2", "sink_max must lie in [sink, budget)"),
    (T + " --budget 16 --passkey-mix -0.1", "passkey_mix must lie in [0, 1]"),
    (T + " --budget 16 --init {d}/missing.json", "--init: cannot read allocation file"),
    (T + " --budget 16 --init {f:alloc_negative}", "--init: "),
    (T + " --budget 16 --tau-schedule cubic", "tau_schedule must be one of"),
    (T + " --budget 16 --edge cubic", "edge must be one of"),
    (T + " --budget 16 --edge log", "the log edge needs tau_start and tau_end below 1"),
    (T + " --budget 16 --edge log --tau-start .5 --tau-end .1 --sink-max 8", "log edge is for windows only"),
    (T + " --budget 16 --max-steps 0", "--max-steps must be between"),
    (T + " --budget 16 --seq-len 0", "--seq-len must be between"),
    (T + " --budget 16 --seq-len 100000", "positions"),
    (T + " --budget 16 --batch-size 0", "--batch-size must be between"),
    (T + " --budget 16 --lr-end-frac 2", "lr_end_frac"),
    (T + " --budget 16 --wandb-mode loud", "wandb_mode must be one of"),
    (T + " --budget 16 --precision bogus", "precision must be one of"),
    (T + " --budget 16 --accelerator tpu9", "accelerator must be one of"),
    (T + " --budget 16 --strategy bogus", "strategy must be one of"),
    (T + " --budget 16 --devices 0", "devices must be a positive integer"),
    (T + " --budget 16 --threads -1", "--threads must be between"),
    (T + " --budget 16 --seed -1", "--seed must be between"),
    (T + " --budget 16 --n-blocks -1", "--n-blocks must be between"),
    (T + " --budget 16 --eval-every 0", "eval_every must be a positive integer"),
    (T + " --budget 16 --wandb-project ''", "wandb_project must not be empty"),
    (T + " --budget 16 --encoding no-such-codec", "unknown text encoding"),
    (T + " --budget 16 --out-dir {f:a_file}", "is a file"),
    (T + " --budget 16 --corpus {f:latin1}", "not valid utf-8"),
    ("train --resume {d}/missing", "does not exist"),
    ("train --resume {f:ckpt_pickle}", "not a plain-tensor checkpoint"),
    ("train --resume {f:ckpt_text}", "cannot read checkpoint"),
    ("train --resume {f:ckpt_empty}", "checkpoint"),
    ("train --resume {f:empty_dir}", "checkpoint"),
    # ---- export --------------------------------------------------------------------------------------------
    ("export", "--out FILE is required"),
    ("export -o {d}/a.json", "give the checkpoint"),
    ("export {d}/missing.ckpt -o {d}/a.json", "does not exist"),
    ("export {f:ckpt_pickle} -o {d}/a.json", "not a plain-tensor checkpoint"),
    ("export {f:ckpt_text} -o {d}/a.json", "cannot read checkpoint"),
    ("export {f:ckpt_empty} -o {d}/a.json", "checkpoint"),
    ("export {f:ckpt_text} -o {f:empty_dir}", "is a folder"),
    ("export {f:ckpt_text} -o {d}/a.json --budget 0", "--budget must be between"),
    ("export {f:ckpt_text} -o {d}/a.json --budget nan", "finite"),
    # ---- fill ----
    ("fill", "give the allocation"),
    ("fill {f:alloc_other_model}", "--out FILE is required"),
    ("fill {f:alloc_json} -o {d}/f.json", "not valid JSON"),
    ("fill {d}/missing.json -o {d}/f.json", "cannot read allocation file"),
    ("fill {f:alloc_other_model} -o {d}/f.json --recent 0", "--recent"),
    ("fill {f:alloc_other_model} -o {d}/f.json --chunk -1", "--chunk"),
    ("fill {f:alloc_other_model} -o {d}/f.json --decay 1.5", "--decay"),
    ("fill {f:alloc_other_model} -o {f:alloc_other_model}", "also an input"),
    # ---- quantize ----
    ("quantize", "give the allocation"),
    ("quantize {f:alloc_json} -o {d}/q.json", "not valid JSON"),
    ("quantize {f:alloc_negative} -o {d}/q.json", "negative value"),
    ("quantize {d}/missing.json -o {d}/q.json", "cannot read allocation file"),
    ("quantize {f:alloc_other_model}", "--out FILE is required"),
    ("quantize {f:alloc_other_model} -o {d}/q.json --classes 0", "--classes must be between"),
    ("quantize {f:alloc_other_model} -o {d}/q.json --classes 5", "--classes must be between"),
    ("quantize {f:alloc_other_model} -o {d}/q.json --classes 3", "has only 2 heads"),
    ("quantize {f:alloc_other_model} -o {f:empty_dir} --classes 1", "is a folder"),
    # ---- generate ------------------------------------------------------------------------------------------
    ("generate --model {m} --policy full", "give --prompt TEXT or --prompts FILE"),
    ("generate --model {m} --policy full --prompt ''", "--prompt is empty"),
    ("generate --model {m} --policy full --prompts {f:prompts_ok}", "needs --out"),
    (G + " --policy full --prompts {f:prompts_bad} --out {d}/o.jsonl", "--prompt TEXT or --prompts FILE"),
    ("generate --model {m} --policy full --prompts {f:prompts_bad} --out {d}/o.jsonl", "not JSON"),
    ("generate --model {m} --policy full --prompts {f:prompts_no_key} --out {d}/o.jsonl",
     "\"prompt\" string"),
    ("generate --model {m} --policy full --prompts {f:prompts_empty_prompt} --out {d}/o.jsonl", "is empty"),
    ("generate --model {m} --policy full --prompts {f:prompts_long} --out {d}/o.jsonl", "beyond the"),
    ("generate --model {m} --policy full --prompts {f:results_empty} --out {d}/o.jsonl", "holds no prompts"),
    ("generate --model {m} --policy full --prompts {d}/none.jsonl --out {d}/o.jsonl", "cannot read prompts"),
    ("generate --model {m} --policy full --prompts {f:binary} --out {d}/o.jsonl", "not UTF-8"),
    ("generate --model {m} --policy full --prompts {f:prompts_ok} --out {f:empty_dir}", "is a folder"),
    ("generate --model {m} --policy full --prompts {f:prompts_ok} --out {d}/o.jsonl --batch-size 0",
     "--batch-size must be between"),
    (G + " --policy B_streaming_16 --static --reindex", "--static and --reindex do not combine"),
    ("generate --model {m} --policy full --prompts {f:prompts_unequal} --out {d}/o.jsonl --batch-size 2"
     " --static",
     "--static needs the prompts of a batch to have one length"),
    (G, "exactly one of"),
    (G + " --policy full --allocation {f:alloc_json}", "exactly one of"),
    (G + " --policy full --max-new-tokens 0", "--max-new-tokens must be between"),
    (G + " --policy full --max-new-tokens 100000", "exceed the model's 512 positions"),
    (G + " --policy full --reindex", "--reindex needs an allocation"),
    (G + " --policy Z_bad", "unknown policy"),
    (G + " --policy full --device tpu", "not a device name"),
    # ---- passkey -------------------------------------------------------------------------------------------
    (P + " --depth 1.5", "--depth must be between"),
    (P + " --depth -0.1", "--depth must be between"),
    (P + " --trials 0", "--trials must be between"),
    (P + " --batch 0", "--batch must be between"),
    (P + " --length 100000", "exceeds the model's 512 positions"),
    (P + " --length 10", "--length must be between"),
    (P + " --seed -1", "--seed must be between"),
    (P + " --policy Z_bad", "unknown policy"),
    (P + " --out {f:empty_dir}", "is a folder"),
    (P + " --plots {f:a_file}", "is a file"),
    (P + " --corpus {f:latin1}", "not valid utf-8"),
    # ---- search --------------------------------------------------------------------------------------------
    (S + " --max-ppl-increase 0", "--max-ppl-increase must be > 0"),
    (S + " --max-ppl-increase -0.02", "--max-ppl-increase must be > 0"),
    (S + " --max-ppl-increase nan", "finite"),
    (S + " --max-ppl-increase x", "valid number"),
    (S + " --budget-min 32", "--budget-min (32) must be below --budget-max (32)"),
    (S + " --budget-min 40", "must be below --budget-max"),
    (S + " --budget-min 3", "--budget-min 3 is infeasible: with sink 4 and --seq-len 64"),
    (S + " --budget-max 100", "--budget-max 100 is infeasible"),
    (S + " --budget-min 0", "--budget-min must be between"),
    (S + " --tolerance -0.1", "--tolerance must be between"),
    (S + " --n-blocks 0", "--n-blocks must be between"),
    (S + " --n-blocks 100000", "blocks"),
    (S + " --max-steps 0", "--max-steps must be between"),
    (S + " --wandb-mode loud", "--wandb-mode must be one of"),
    (S + " --dtype int8", "--dtype must be one of"),
    (S + " --device tpu", "not a device name"),
    (S + " --seq-len 100000 --budget-max 64", "exceeds the model's 512 positions"),
    (S + " --model {f:gpt2_dir}", "model family 'gpt2' is not supported"),
    (S + " --corpus {d}/missing.txt", "corpus path not found"),
    (S + " --corpus {f:latin1}", "not valid utf-8"),
    (S + " --corpus {f:empty_dir}", "no .txt files"),
    (S + " --out-dir {f:a_file}", "is a file"),
    (S + " --out-dir {f:search_dir}", "cannot resume"),
    (S + " --out-dir {f:search_bad_dir}", "is not a search file"),
    (S + " --train-config {d}/missing.yaml", "cannot read config"),
    (S + " --train-config {f:yaml_unknown}", "unknown key(s)"),
    (S + " --train-config {f:train_yaml_bad}", "'lr' must be float"),
    (S + " --train-config {f:train_yaml_ddp}", "devices=2"),
    ("search --config {f:yaml_unknown}", "unknown key(s)"),
    ("search --objective mse", "--objective must be one of"),
    ("plot {f:search_malformed}", "a search file with a missing or malformed curve"),
    # ---- nothing lost: an output that is an input, or a file of another kind, is refused before any work --
    (E + " --allocation {f:alloc_good} --out {f:alloc_good}", "is also an input"),
    ("export {f:ckpt_text} -o {f:ckpt_text}", "is also an input"),
    ("quantize {f:alloc_other_model} -o {f:alloc_other_model} --classes 1", "is also an input"),
    ("generate --model {m} --policy full --prompts {f:prompts_ok} --out {f:prompts_ok}", "is also an input"),
    (E + " --out {f:notes}", "exists and is not a headkv results file"),
    (E + " --mode streaming --out {f:one_line}", "exists and is not a headkv results file"),
    ("sweep {f:grid_ok} --model {m} --corpus {t} --seq-len 64 --out {f:one_line}", "is not a headkv results"),
    (P + " --out {f:one_line}", "exists and is not a headkv results file"),
    ("generate --model {m} --policy full --prompts {f:prompts_ok} --out {f:results_ok}",
     "is not a file of `headkv generate` rows"),
    ("export {f:ckpt_text} -o {f:notes}", "exists and is not an allocation file"),
    ("quantize {f:alloc_other_model} -o {f:results_ok} --classes 1", "exists and is not an allocation file"),
    ("classify --model {m} --corpus {t} --out {f:notes}", "exists and is not a head profile"),
    # ---- files and permissions ---------------------------------------------------------------------------
    (E + " --out {f:readonly}", "is read-only"),
    (E + " --out {f:fifo}", "not a regular file"),
    (E + " --out /dev/null", "not a regular file"),
    # ---- numbers beyond int64, malformed structure: one clear line, never "internal" ----------------------
    (E + " --allocation {f:alloc_huge}", "above 1e+12 keys"),
    (E + " --allocation {f:alloc_sum_2_63}", "above 1e+12 keys"),
    (E + " --policy B_streaming_99999999999999999999999", "above 1e+12 keys"),
    (E + " --policy A_window_" + "9" * 400, "out of range"),
    (E + " --policy G_conf0.5_base99999999999999999999999 --profile {f:profile_ok}", "above 1e+12 keys"),
    (T + " --budget 16 --init {f:alloc_huge}", "above 1e+12 keys"),
    (E + " --allocation {f:alloc_meta_list}", "'meta' must be a JSON object"),
    (E + " --allocation {f:alloc_deep}", "nested too deeply"),
    (E + " --policy G_conf0.5_base8 --profile {f:alloc_deep}", "nested too deeply"),
    ("plot {f:results_deep}", "not a JSON row"),
    ("evaluate --config {f:yaml_deep}", "not valid YAML"),
    ("sweep {f:grid_int_key} --model {m} --corpus {t} --seq-len 64", "a policy-name template (a string)"),
    ("sweep {f:grid_brace} --model {m} --corpus {t} --seq-len 64", "is not a template"),
    ("sweep {f:grid_values_list} --model {m} --corpus {t} --seq-len 64", "must map to its fields' values"),
    ("passkey --config {f:yaml_length_empty}", "--length needs at least one value"),
    ("evaluate --model {f:model_pickle} --corpus {t} --tokens 64 --seq-len 32", "cannot load model"),
    ("evaluate --config {f:yaml_escape}", "unknown key(s)"),  # printed escaped: no raw escape code
    # ---- silently accepted before: said what is valid ------------------------------------------------------
    ("sweep {f:grid_ok} --model {m} --corpus {t} --seq-len 64 --controls shuffled",
     "--controls are controls of allocation files"),
    (E + " --corpus /dev/null", "not a regular file or a folder"),
    (E + " --corpus {f:fifo}", "not a regular file or a folder"),
    (E + " --corpus ''", "the corpus name is empty"),
    ("evaluate --model {m} --corpus {t} --tokens 16 --seq-len 32", "--tokens must be at least --seq-len"),
    ("sweep {f:grid_ok} --model {m} --corpus {t} --tokens 16 --seq-len 64", "--tokens must be at least"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm):
    root = make_tiny_dir(tmp_path_factory.mktemp("contract"), smollm[1])
    return root, _files(root, root / "model")


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("args,message", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(world, tmp_path, monkeypatch, args, message):
    import shlex

    root, files = world
    monkeypatch.chdir(tmp_path)  # default outputs (results/, runs/) would land here
    (tmp_path / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    words = [w.replace("{m}", str(root / "model")).replace("{t}", str(root / "text.txt"))
             .replace("{d}", str(tmp_path)) for w in shlex.split(args)]
    words = [re.sub(r"\{f:(\w+)\}", lambda m: str(files[m.group(1)]), w) for w in words]
    before, before_root = _listing(tmp_path), _listing(root)
    MARKER.unlink(missing_ok=True)
    r = cli_run(*words)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr[-2000:])
    assert message.lower() in lines[0].lower(), (args, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    assert "\x1b" not in r.stderr + r.stdout  # names from files never reach the terminal raw
    assert _listing(tmp_path) == before, (args, _listing(tmp_path) - before)  # nothing partial or stray
    assert _listing(root) == before_root, (args, _listing(root) ^ before_root)
    assert not MARKER.exists()  # a crafted pickle never ran


def test_the_table_covers_every_command_and_a_hundred_inputs():
    commands = {c.split()[0] for c, _ in CASES}
    assert {"evaluate", "classify", "sweep", "plot", "train", "export", "quantize", "generate",
            "passkey", "search"} <= commands
    assert len(CASES) >= 100


def test_ctrl_c_says_what_was_kept_and_exits_130(world, tmp_path, monkeypatch):
    import headkv.alloc.evaluate

    root, _ = world
    out = tmp_path / "r.jsonl"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(headkv.alloc.evaluate, "evaluate", interrupted)
    r = cli_run("evaluate", "--model", str(root / "model"), "--corpus", str(root / "text.txt"),
                "--tokens", "64", "--seq-len", "32", "--out", str(out))
    assert r.returncode == 130 and "interrupted" in r.stderr and str(out) in r.stderr
    assert "Traceback" not in r.stderr


# ---- nothing lost: appends, replaced files, reruns ---------------------------------------------------------
def test_two_writer_processes_appending_at_once_lose_no_row(tmp_path):
    import subprocess
    import sys

    out, repo = tmp_path / "rows.jsonl", Path(__file__).parents[1]
    code = ("import sys\nfrom alloc.results import append_row\nfor i in range(400):\n"
            "    append_row(sys.argv[1], {'kind': 'evaluate', 'writer': sys.argv[2], 'i': i})\n")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), w], cwd=repo, env=env) for w in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 800
    assert {(r["writer"], r["i"]) for r in rows} == {(w, i) for w in "ab" for i in range(400)}


def test_an_append_drops_only_a_torn_row(tmp_path):
    from headkv.alloc.results import ResultsError, append_row, read_rows

    torn, whole, notes = tmp_path / "torn.jsonl", tmp_path / "whole.jsonl", tmp_path / "notes.txt"
    torn.write_text('{"kind": "sweep", "i": 0}\n{"kind": "sw')  # a crash during the write of row 1
    whole.write_text('{"kind": "sweep", "i": 0}\n{"kind": "sweep", "i": 1}')  # a row without its newline
    notes.write_text("a note\nits last line")
    for f in (torn, whole):
        append_row(f, {"kind": "sweep", "i": 9})
    assert [r["i"] for r in read_rows(torn)] == [0, 9]
    assert [r["i"] for r in read_rows(whole)] == [0, 1, 9]
    with pytest.raises(ResultsError):
        append_row(notes, {"kind": "sweep", "i": 9})
    assert notes.read_text() == "a note\nits last line"


def test_a_replaced_output_keeps_its_mode_a_new_one_the_umask_and_a_link_its_target(tmp_path):
    import stat

    from headkv.models.common import atomic_write

    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o600)
    atomic_write(kept, lambda tmp: tmp.write_text("new"))
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o600
    umask = os.umask(0o027)
    try:
        fresh = atomic_write(tmp_path / "fresh.json", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write(link, lambda tmp: tmp.write_text("new"))
    assert link.is_symlink() and target.read_text() == "new"
    names = sorted(p.name for p in tmp_path.iterdir())  # and no temp file is left
    assert names == ["fresh.json", "kept.json", "link.json", "target.json"]


def test_evaluate_rerun_after_a_kill_resumes_by_key_and_prints_names_escaped(world, tmp_path, monkeypatch):
    import headkv.alloc.evaluate

    root, files = world
    named = tmp_path / "named.json"  # an allocation whose name holds a terminal escape code
    good = json.loads(files["alloc_good"].read_text())
    named.write_text(json.dumps({**good, "meta": {"policy": "\x1b]0;red\x07"}}))
    out = tmp_path / "r.jsonl"
    args = ["evaluate", "--model", str(root / "model"), "--corpus", str(root / "text.txt"), "--tokens", "64",
            "--seq-len", "32", "--out", str(out), "--policy", "full", "--policy", "B_streaming_8",
            "--policy", "B_streaming_16", "--allocation", str(named)]
    real, calls = headkv.alloc.evaluate.evaluate, []

    def killed_at_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(headkv.alloc.evaluate, "evaluate", killed_at_the_third)
    assert cli_run(*args).returncode == 130 and len(out.read_text().splitlines()) == 2
    monkeypatch.setattr(headkv.alloc.evaluate, "evaluate", real)
    r = cli_run(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and len({x["key"] for x in rows}) == 4  # the 2 kept rows are not written twice
    assert r.stderr.count("already measured") == 2 and "appended 2 row(s)" in r.stdout
    assert "\x1b" not in r.stdout + r.stderr and "\\x1b]0;red\\x07" in r.stdout
    r = cli_run("quantize", str(named), "-o", str(tmp_path / "q.json"), "--classes", "1")
    assert r.returncode == 0 and "\x1b" not in r.stdout + r.stderr and "\\x1b]0;red\\x07" in r.stdout


@pytest.mark.parametrize("run_id", ["../escaped", "a/b", ".."])
def test_a_run_id_that_is_not_a_plain_name_is_refused(world, tmp_path, monkeypatch, run_id):
    root, _ = world
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("HEADKV_RUN_ID", run_id)
    r = cli_run("train", "--model", str(root / "model"), "--corpus", str(root / "text.txt"), "--budget", "16",
                "--seq-len", "32", "--max-steps", "1", "--wandb-mode", "disabled")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: HEADKV_RUN_ID"), r.stderr
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / "escaped").exists()
