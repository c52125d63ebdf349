"""slmlab: train and compare small language-model architectures on Ray, DeepSpeed and MLflow."""
import os as _os
import sys as _sys

# Local mode binds Ray to loopback. Ray reads this flag once, when it is first imported, so it is
# set here — before any slmlab module imports ray. It changes nothing when joining a cluster
# (RAY_ADDRESS set), where the cluster's own addresses are used.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Ray Train V2 patches print() in its workers to go through its logger, which also writes to the
# console: with Ray's own stdout forwarding every worker line reached the driver twice. Off, the
# worker's prints go through Ray's log forwarding alone (Train propagates this to its workers).
_os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

# Ray Train's controller notices a finished (or failed) worker group, and collects reported
# checkpoints, only when it polls, every 2 s by default: a run's start and its end each waited for a
# poll. At 0.5 s a do-nothing fit takes 17.9 s instead of 21.5 s here (benchmarks/bench_run_fixed_cost.py);
# a poll is one small RPC per worker, cheap even for large groups. Train propagates it to its actors.
_os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# DeepSpeed JIT-builds its CPU ops (the shared-memory collective every CPU run loads: ~40 s) into torch's
# extension folder, by default one per user: two virtual environments (a second checkout, a fresh clone)
# then overwrite each other's build, and each rebuilds it on its next run, seen here as a 40 s DeepSpeed
# start every other run. One folder per environment, as bin/_env.sh sets it; Ray's workers inherit it.
if "TORCH_EXTENSIONS_DIR" not in _os.environ and _sys.prefix != _sys.base_prefix:
    _os.environ["TORCH_EXTENSIONS_DIR"] = _os.path.join(_sys.prefix, "torch_extensions")

# Those builds run whichever `ninja` is first on PATH, and a ninja of another version cannot read the
# build log and rebuilds both ops (~60 s). bin/ puts the environment's ninja first (the one set-up built
# with); a bare `.venv/bin/python ...` (how the benchmarks are run) found the system's instead, and the
# two took turns rebuilding. So the environment's own bin/ goes first, as activating it would do.
_env_bin = _os.path.join(_sys.prefix, "bin")
_path = _os.environ.get("PATH", "")
if _sys.prefix != _sys.base_prefix and _os.path.isfile(_os.path.join(_env_bin, "ninja")):
    if _path.split(_os.pathsep)[0] != _env_bin:
        _os.environ["PATH"] = _env_bin + _os.pathsep + _path

__version__ = "0.1.0"
