#!/usr/bin/env bash
# Make bench/peers/.venv: kvpress 0.5.5 in its own virtual environment (it pins transformers < 5.3,
# headkv needs >= 5.24, so the two never share one). Idempotent: rerunning checks and reuses the venv.
# torch is installed first at the exact pin and held there by a constraints file, so pip never
# resolves kvpress's dependencies to another torch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"
torch_pin="torch==2.13.0"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
cons="$venv/constraints.txt"
echo "$torch_pin" > "$cons"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
  "$venv/bin/pip" install --quiet "$torch_pin"
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('kvpress') == '0.5.5' else 1)" 2>/dev/null; then
  "$venv/bin/pip" install --quiet -c "$cons" "kvpress==0.5.5"
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
import torch, transformers
from packaging.version import Version
tv = Version(transformers.__version__)
print(f"peers venv: torch {torch.__version__}, transformers {tv}, kvpress {m.version('kvpress')}")
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert tv < Version("5.3"), f"transformers {tv} is not < 5.3"
PY
