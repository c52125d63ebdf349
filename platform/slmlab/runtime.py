"""Connect to Ray: join the cluster named by RAY_ADDRESS, or start a private local one on loopback."""

from __future__ import annotations

import os

import ray

# environment every Ray process of ours gets: quiet tokenizers, CPU DeepSpeed unless a GPU is used
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def verbose() -> bool:
    """``slmlab --verbose`` (SLMLAB_VERBOSE=1): Ray's own progress bars and INFO logs come back."""
    return os.environ.get("SLMLAB_VERBOSE") == "1"


def quiet_logs() -> None:
    """Ray's and MLflow's progress bars, INFO lines and self-inflicted warnings are for debugging
    those libraries; a person running a pipeline sees slmlab's own progress lines instead (unless
    --verbose)."""
    import logging

    from ray.data import DataContext

    if verbose():
        return
    DataContext.get_current().enable_progress_bars = False
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spend Ray's one "progress bars disabled" warning
    for name in ("ray.data", "ray.train", "ray.tune", "mlflow.store.db.utils"):  # the last: "Creating tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    # Ray Data's own default ingest options trip its own deprecation of `exclude_resources`
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")


def ensure_ray(num_cpus: int | None = None) -> None:
    quiet_logs()
    if ray.is_initialized():
        return
    import logging

    level = logging.INFO if verbose() else logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        # a cluster, or `ray job submit` (which sets RAY_ADDRESS for the driver). No runtime_env
        # here: a job's own runtime env must not be contradicted (Ray refuses to merge them), and
        # everything workers need travels in the train-loop config or is set by the worker itself.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level=level)
        return
    env = {
        **WORKER_ENV,
        "SLMLAB_VERBOSE": "1" if verbose() else "0",
        # Ray Data's actors (a run's dataset SplitCoordinators) log each evaluation's execution plan
        # at INFO, four lines a time: debugging output, back with --verbose
        "RAY_DATA_LOG_LEVEL": os.environ.get("RAY_DATA_LOG_LEVEL") or ("INFO" if verbose() else "ERROR"),
    }  # the MLflow store travels explicitly in each train-loop config
    # local mode: everything bound to loopback, dashboard included (see slmlab/__init__.py)
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        import warnings

        warnings.warn(
            "ray was imported before slmlab with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset: local Ray may "
            "advertise a non-loopback address; import slmlab first or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
        )
    # Ray turns token authentication on by default for a new local cluster (good) and prints a
    # warning line saying so; that line is not news to a user of slmlab (see cluster/README.md)
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # address="local": always a fresh Ray of our own. With address=None Ray joins whatever
    # /tmp/ray/ray_current_cluster names, a stale entry from a killed session included, and then
    # retries for minutes before failing; a user with a running cluster sets RAY_ADDRESS instead.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        configure_logging=True,
        logging_level=level,
        log_to_driver=True,
    )
