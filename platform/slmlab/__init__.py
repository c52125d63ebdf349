"""slmlab: train and compare small language-model architectures on Ray, DeepSpeed and MLflow."""
import os as _os

# Local mode binds Ray to loopback. Ray reads this flag once, when it is first imported, so it is
# set here — before any slmlab module imports ray. It changes nothing when joining a cluster
# (RAY_ADDRESS set), where the cluster's own addresses are used.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Ray Train V2 patches print() in its workers to go through its logger, which also writes to the
# console: with Ray's own stdout forwarding every worker line reached the driver twice. Off, the
# worker's prints go through Ray's log forwarding alone (Train propagates this to its workers).
_os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

__version__ = "0.1.0"
