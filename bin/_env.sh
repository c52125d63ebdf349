# Sourced by bin/slmlab and bin/test: create or refresh the project's virtual environment when it
# is missing or when pyproject.toml / constraints.txt changed since it was built.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLMLAB_VENV:-$ROOT/.venv}"
STAMP="$VENV/.slmlab-installed"
# DeepSpeed's JIT-built ops live beside the environment that built them: in torch's shared default
# (~/.cache/torch_extensions) two checkouts' environments overwrite each other's build and each rebuilds
# it (~40 s) on its next run (slmlab/__init__.py sets the same folder when bin/ is not used)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/bin/_env.sh" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "[slmlab] setting up $VENV (first run: ~3 minutes)" >&2
  PY="${PYTHON:-python3}"
  "$PY" -m venv "$VENV"
  # the environment's tools first, during set-up too: DeepSpeed's op builds below must use the venv's ninja
  # (1.13), the one every later run uses; a system ninja (1.11 here) writes a build log the venv's cannot
  # read, and the first training run then rebuilt both ops from scratch (~2 minutes)
  export PATH="$VENV/bin:$PATH"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # torch first and pinned: an unpinned torch (or deepspeed first) pulls a multi-GB CUDA build.
  # On a GPU machine, install the CUDA torch 2.13 build into the venv beforehand; this keeps it.
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]" >&2
  # DeepSpeed JIT-compiles its CPU shared-memory collective on first use (~40 s): do it once here.
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1 \
    || echo "[slmlab] note: DeepSpeed's CPU comm op did not prebuild; it will build on first training run" >&2
  # and its CPU Adam (train.optimizer: cpu_adam, the partner of offload_optimizer): ~70 s, once
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
    || echo "[slmlab] note: DeepSpeed's CPU Adam did not prebuild; it will build when train.optimizer is cpu_adam" >&2
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"  # local Ray binds 127.0.0.1
