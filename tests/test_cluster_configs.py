"""The cluster launcher configs, the job runtime env and the Tune search spaces are valid.

The cluster YAMLs go through the same two steps `ray up` applies before it touches a cloud
(ray.autoscaler._private.commands._bootstrap_config): ``prepare_config`` (provider defaults,
the local provider's node-type synthesis, setup-command merging) and ``validate_config``
(Ray's packaged ray-schema.json plus its semantic checks). Only the provider's network calls
(EC2 lookups, key pairs) are skipped. Every check has a negative twin on a corrupted copy in
tmp_path, so a test that cannot fail would show up as a failing negative test.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
AWS_CONFIG = CLUSTER_DIR / "cluster.yaml"
LOCAL_CONFIG = CLUSTER_DIR / "cluster.local.yaml"
CLUSTER_CONFIGS = [AWS_CONFIG, LOCAL_CONFIG]
RUNTIME_ENV = CLUSTER_DIR / "runtime_env.yaml"
SEARCH_SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def validate_cluster_config(path: Path) -> dict:
    """What `ray up` does to a config before any provider call; returns the prepared config."""
    config = load_yaml(path)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def all_commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_LISTS for cmd in config.get(key, [])]


def env_file_command(commands: list[str]) -> str:
    """The setup command that writes ~/.slmlab.env (exactly one per node role)."""
    found = [c for c in commands if "> ~/.slmlab.env" in c]
    assert len(found) == 1, f"expected one command writing ~/.slmlab.env, found {found}"
    return found[0]


def exported_names(env_command: str) -> set[str]:
    return set(re.findall(r"export ([A-Z_][A-Z0-9_]*)=", env_command))


def load_runtime_env(path: Path) -> RuntimeEnv:
    """Build the RuntimeEnv `ray job submit --runtime-env` would; reject unknown fields.

    RuntimeEnv forwards unknown keys verbatim (plugins), so a typo such as ``env_var`` would
    otherwise be accepted and silently do nothing.
    """
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: a runtime env is a mapping, got {type(data).__name__}")
    unknown = set(data) - RuntimeEnv.known_fields
    if unknown:
        raise ValueError(f"{path}: not RuntimeEnv fields: {sorted(unknown)}")
    return RuntimeEnv(**data)


DISTRIBUTIONS = {"choice", "grid", "uniform", "loguniform", "randint"}
SEARCH_SPACE_KEYS = {"metric", "mode", "num_samples", "params"}
# Optional knobs the sweep command (slmlab.sweep.SearchSpace) also accepts.
OPTIONAL_SEARCH_SPACE_KEYS = {"max_concurrent_trials", "grace_steps", "reduction_factor"}
DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
MAX_TRIALS = 16  # these sweeps must stay runnable on a 2-core CPU box


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_search_space(space: Any) -> None:
    """Raise ValueError unless ``space`` is a well-formed sweep file (see search_spaces/)."""
    if not isinstance(space, dict):
        raise ValueError("a search space is a mapping")
    if not SEARCH_SPACE_KEYS <= set(space) <= SEARCH_SPACE_KEYS | OPTIONAL_SEARCH_SPACE_KEYS:
        raise ValueError(
            f"top-level keys must be {sorted(SEARCH_SPACE_KEYS)} (optionally "
            f"{sorted(OPTIONAL_SEARCH_SPACE_KEYS)}), got {sorted(space)}"
        )
    if not isinstance(space["metric"], str) or not space["metric"]:
        raise ValueError("metric must be a non-empty string")
    if space["mode"] not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {space['mode']!r}")
    n = space["num_samples"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_samples must be a positive int, got {n!r}")
    params = space["params"]
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty mapping")
    for path, spec in params.items():
        if not isinstance(path, str) or not DOTTED.match(path):
            raise ValueError(f"param {path!r} is not a dotted pipeline field path")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ValueError(f"{path}: expected exactly one distribution, got {spec!r}")
        ((kind, args),) = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"{path}: unknown distribution {kind!r}; allowed {sorted(DISTRIBUTIONS)}")
        if not isinstance(args, list):
            raise ValueError(f"{path}: {kind} takes a list, got {args!r}")
        if kind in ("choice", "grid"):
            if not args:
                raise ValueError(f"{path}: {kind} needs at least one value")
            if len(set(map(json.dumps, args))) != len(args):
                raise ValueError(f"{path}: {kind} has duplicate values")
        else:
            if len(args) != 2 or not all(_is_number(a) for a in args):
                raise ValueError(f"{path}: {kind} takes [low, high] numbers, got {args!r}")
            low, high = args
            if not low < high:
                raise ValueError(f"{path}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"{path}: loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"{path}: randint bounds must be ints, got {args!r}")


def n_trials(space: dict) -> int:
    grids = [len(a) for spec in space["params"].values() for kind, a in spec.items() if kind == "grid"]
    return space["num_samples"] * math.prod(grids)


# --------------------------------------------------------------------------- cluster configs


def test_both_cluster_configs_are_present():
    assert AWS_CONFIG.is_file() and LOCAL_CONFIG.is_file()


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_own_validation(path):
    prepared = validate_cluster_config(path)
    # validate_config must really have run against the packaged schema: check it is the file
    # we think it is and that the prepared config also passes it when checked directly.
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(prepared, json.loads(schema_path.read_text()))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_config_shape():
    raw = load_yaml(AWS_CONFIG)
    assert raw["provider"]["type"] == "aws"
    assert raw["provider"]["region"] and raw["provider"]["availability_zone"]
    assert all(z.startswith(raw["provider"]["region"]) for z in raw["provider"]["availability_zone"].split(","))
    prepared = validate_cluster_config(AWS_CONFIG)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    # CPU head that never receives training tasks; GPU workers that scale to zero.
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0
    assert workers, "no worker node type"
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types:
        assert t["min_workers"] == 0 < t["max_workers"] <= prepared["max_workers"]
        assert t["node_config"]["InstanceType"]
    # Head and GPU workers each get their own setup on top of the common one.
    assert len(prepared["head_setup_commands"]) > len(raw["setup_commands"])
    assert len(prepared["worker_setup_commands"]) > len(raw["setup_commands"])


def test_local_config_shape():
    raw = load_yaml(LOCAL_CONFIG)
    assert raw["provider"]["type"] == "local"
    assert isinstance(raw["provider"]["head_ip"], str) and raw["provider"]["head_ip"]
    assert raw["provider"]["worker_ips"] and all(isinstance(ip, str) for ip in raw["provider"]["worker_ips"])
    # The local provider aborts on these; it synthesises its node type from the IPs.
    assert "available_node_types" not in raw and "head_node_type" not in raw
    prepared = validate_cluster_config(LOCAL_CONFIG)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_every_command_is_valid_bash(path):
    config = load_yaml(path)
    commands = all_commands(config)
    assert commands
    for cmd in commands:
        # Ray runs each entry as its own `bash --login -c -i` command line.
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: bash syntax error in {cmd!r}: {result.stderr}"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_dashboard_loopback_and_mlflow_on_head(path):
    config = load_yaml(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in "\n".join(all_commands(config)), "nothing may bind every interface"
    (ray_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in ray_start
    (mlflow,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert '--host "$SLMLAB_HEAD_IP"' in mlflow and "--port 5000" in mlflow
    # SQLite on the head's own disk (never on the NFS/EFS share), artifacts on the share.
    assert re.search(r'--backend-store-uri "sqlite:///\$HOME/', mlflow)
    assert '--artifacts-destination "$SLMLAB_SHARED/' in mlflow
    assert "/health" in mlflow, "ray up should fail if MLflow does not come up"
    for cmd in config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--address=$RAY_HEAD_IP:6379" in cmd


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_nodes_share_project_token_and_environment(path):
    config = load_yaml(path)
    mounts = config["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    # What `pip install -e ~/slmlab` needs, and nothing as large/volatile as "." (ray up hashes
    # every mounted byte and restarts the cluster when the hash changes).
    project = {remote: local for remote, local in mounts.items() if remote.startswith("~/slmlab/")}
    assert {"pyproject.toml", "platform"} <= set(project.values())
    assert "." not in mounts.values()
    for remote, local in project.items():
        assert remote == "~/slmlab/" + local
        # `ray up` asserts that every mounted local path exists (run from the repo root).
        assert (REPO / local).exists(), f"{path.name}: file_mounts source {local} is missing"
    assert {"__pycache__", "*.egg-info"} <= set(config["rsync_exclude"])
    setup = "\n".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert "-e ~/slmlab" in setup and "torch" in setup
    head_env = env_file_command(config["head_setup_commands"])
    worker_env = env_file_command(config["worker_setup_commands"])
    for env_cmd in (head_env, worker_env):
        assert "export RAY_AUTH_MODE=token" in env_cmd
        assert {"SLMLAB_HEAD_IP", "SLMLAB_SHARED", "MLFLOW_TRACKING_URI", "SLMLAB_STORAGE"} <= exported_names(env_cmd)
    assert '"$RAY_HEAD_IP" "$RAY_HEAD_IP"' in worker_env
    # Both start commands load that file, so the raylet (and every Ray worker) inherits it.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert start.startswith(". ~/.slmlab.env &&")


def test_env_files_write_what_they_claim(tmp_path):
    """Run the worker env-file command for real and source the result."""
    config = load_yaml(AWS_CONFIG)
    cmd = env_file_command(config["worker_setup_commands"])
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.1.2.3"}
    subprocess.run(["bash", "-c", cmd], env=env, check=True)
    out = subprocess.run(
        ["bash", "-c", ". ~/.slmlab.env && echo $MLFLOW_TRACKING_URI $SLMLAB_STORAGE $RAY_AUTH_MODE"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == ["http://10.1.2.3:5000", "/mnt/efs/slmlab/ray_results", "token"]
    # Without a head address the command must fail instead of writing an empty URI.
    env.pop("RAY_HEAD_IP")
    (tmp_path / ".slmlab.env").unlink()
    assert subprocess.run(["bash", "-c", cmd], env=env).returncode != 0
    assert not (tmp_path / ".slmlab.env").exists()


# --------------------------------------------------------------------------- negative twins


def _corrupt(src: Path, tmp_path: Path, mutate) -> Path:
    config = load_yaml(src)
    mutate(config)
    dst = tmp_path / src.name
    dst.write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


def test_unmodified_copy_still_validates(tmp_path):
    """Control for the negative tests: the YAML round-trip alone does not break anything."""
    for src in CLUSTER_CONFIGS:
        validate_cluster_config(_corrupt(src, tmp_path, lambda c: None))


def test_misspelled_top_level_key_fails_schema(tmp_path):
    def mutate(c):
        c["head_start_ray_command"] = c.pop("head_start_ray_commands")

    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        validate_cluster_config(_corrupt(AWS_CONFIG, tmp_path, mutate))


def test_non_integer_gpu_resource_fails_schema(tmp_path):
    def mutate(c):
        c["available_node_types"]["slmlab.gpu"]["resources"]["GPU"] = "one"

    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_config(_corrupt(AWS_CONFIG, tmp_path, mutate))


def test_missing_node_config_fails_schema(tmp_path):
    def mutate(c):
        del c["available_node_types"]["slmlab.gpu"]["node_config"]

    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_cluster_config(_corrupt(AWS_CONFIG, tmp_path, mutate))


def test_unknown_head_node_type_fails(tmp_path):
    def mutate(c):
        c["head_node_type"] = "no.such.type"

    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster_config(_corrupt(AWS_CONFIG, tmp_path, mutate))


def test_min_workers_over_global_max_fails(tmp_path):
    def mutate(c):
        c["available_node_types"]["slmlab.gpu"]["min_workers"] = c["max_workers"] + 1

    with pytest.raises(ValueError, match="max_workers"):
        validate_cluster_config(_corrupt(AWS_CONFIG, tmp_path, mutate))


def test_local_config_with_node_types_is_refused(tmp_path):
    def mutate(c):
        c["available_node_types"] = {"x": {"resources": {}, "node_config": {}}}
        c["head_node_type"] = "x"

    with pytest.raises(click.ClickException):
        validate_cluster_config(_corrupt(LOCAL_CONFIG, tmp_path, mutate))


def test_local_config_without_worker_ips_is_refused(tmp_path):
    with pytest.raises(click.ClickException):
        validate_cluster_config(_corrupt(LOCAL_CONFIG, tmp_path, lambda c: c["provider"].pop("worker_ips")))


def test_broken_yaml_text_fails(tmp_path):
    dst = tmp_path / "cluster.yaml"
    text = AWS_CONFIG.read_text().replace("available_node_types:\n", "available_node_types:\n bad: [\n", 1)
    assert text != AWS_CONFIG.read_text()
    dst.write_text(text)
    with pytest.raises(yaml.YAMLError):
        validate_cluster_config(dst)


def test_bash_check_catches_a_broken_command():
    result = subprocess.run(["bash", "-n", "-c", "if [ -f x ]; then echo"], capture_output=True)
    assert result.returncode != 0


# --------------------------------------------------------------------------- runtime env


def test_runtime_env_builds():
    env = load_runtime_env(RUNTIME_ENV)
    assert isinstance(env, RuntimeEnv)
    env_vars = env.env_vars()
    assert "SLMLAB_STORAGE" in env_vars
    # Comes from the nodes' environment; setting it here breaks ray.init in the job (see below).
    assert "MLFLOW_TRACKING_URI" not in env_vars
    assert "DS_ACCELERATOR" not in env_vars, "DeepSpeed must autodetect CUDA on the cluster"
    assert "pip" not in env and "conda" not in env and "uv" not in env, "deps are installed per node"
    assert "working_dir" not in env, "passed as --working-dir on the command line"
    excludes = env["excludes"]
    for must in ("/.venv/", ".git/", "/runs/"):
        assert must in excludes
    # ...and they really exclude what they should, and only that, with Ray's own matcher.
    from ray._private.runtime_env.packaging import _get_excludes

    matches = _get_excludes(REPO, excludes)
    for p in (".venv/bin/python", "runs/x/ckpt.pt", ".git/HEAD", "platform/slmlab/__pycache__/a.pyc"):
        assert matches(REPO / p), p
    for p in ("platform/slmlab/__init__.py", "pipelines/vectorslm.yaml", "platform/slmlab/runs/x.py"):
        assert not matches(REPO / p), p
    # py_modules are paths relative to the repo root, where `ray job submit` runs.
    for module in env.py_modules():
        assert (REPO / module / "__init__.py").is_file(), module


def test_runtime_env_vars_expand_from_the_nodes_env_file(monkeypatch):
    """Every ${VAR} the runtime env uses is exported by both cluster configs' env files, and
    Ray's own expansion turns them into the values the cluster expects."""
    from ray._private.utils import update_envs

    env_vars = load_runtime_env(RUNTIME_ENV).env_vars()
    referenced = {v for value in env_vars.values() for v in re.findall(r"\$\{([A-Z0-9_]+)\}", value)}
    assert referenced == {"SLMLAB_SHARED"}
    for path in CLUSTER_CONFIGS:
        config = load_yaml(path)
        for key in ("head_setup_commands", "worker_setup_commands"):
            assert referenced <= exported_names(env_file_command(config[key])), (path.name, key)

    monkeypatch.setenv("SLMLAB_SHARED", "/mnt/efs/slmlab")
    for name in env_vars:
        monkeypatch.setenv(name, "before")  # restored by monkeypatch after update_envs
    update_envs(env_vars)
    assert os.environ["SLMLAB_STORAGE"] == "/mnt/efs/slmlab/ray_results"


def test_joining_a_cluster_passes_no_runtime_env_to_clash_with_the_jobs(monkeypatch):
    """Ray refuses to merge a job's runtime env with a driver's ray.init(runtime_env=...) that sets
    the same env var, killing the job on its first line; under RAY_ADDRESS slmlab passes none."""
    from slmlab import runtime

    captured: dict = {}
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda *a, **kw: captured.update(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # what `ray job submit` sets for the driver
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.7:5000")  # from ~/.slmlab.env
    runtime.ensure_ray()
    assert captured["address"] == "10.0.0.7:6379"
    assert "runtime_env" not in captured


def test_runtime_env_with_unknown_field_fails(tmp_path):
    data = load_yaml(RUNTIME_ENV)
    data["env_var"] = data.pop("env_vars")
    bad = tmp_path / "runtime_env.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="env_var"):
        load_runtime_env(bad)


def test_runtime_env_with_non_string_env_var_fails(tmp_path):
    data = load_yaml(RUNTIME_ENV)
    data["env_vars"]["OMP_NUM_THREADS"] = 4  # must be "4"
    bad = tmp_path / "runtime_env.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(TypeError):
        load_runtime_env(bad)


# --------------------------------------------------------------------------- search spaces


def test_expected_search_spaces_exist():
    names = {p.name for p in SEARCH_SPACES}
    assert {"moe.yaml", "context.yaml"} <= names


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_search_space_is_well_formed(path):
    space = load_yaml(path)
    check_search_space(space)
    assert n_trials(space) <= MAX_TRIALS, f"{path.name}: {n_trials(space)} trials is too many for 2 CPUs"
    # The specs are real Tune distributions, and samples land inside the declared ranges.
    from slmlab.sweep import load_space

    tune_space = load_space(path).tune_space()  # what `slmlab sweep` hands to Tune
    for param, spec in space["params"].items():
        ((kind, args),) = spec.items()
        if kind == "grid":
            assert tune_space[param] == {"grid_search": args}
            continue
        for _ in range(20):
            value = tune_space[param].sample()
            if kind == "choice":
                assert value in args
            elif kind == "randint":
                assert args[0] <= value < args[1]
            else:
                assert args[0] <= value <= args[1]


def test_search_space_contents():
    moe = load_yaml(REPO / "search_spaces" / "moe.yaml")
    assert set(moe["params"]) == {
        "model.moe.num_experts",
        "model.moe.top_k",
        "model.moe.load_balance_weight",
        "model.moe.capacity_factor",
    }
    # Every sampled top_k must be routable with every sampled expert count.
    experts = moe["params"]["model.moe.num_experts"]["choice"]
    top_k = moe["params"]["model.moe.top_k"]["choice"]
    assert all(k <= e for k, e in itertools.product(top_k, experts))
    context = load_yaml(REPO / "search_spaces" / "context.yaml")
    searched = {"model.context_dim", "data.seq_len", "model.n_layers"}
    pinned = {"train.tokens_per_step", "train.eval_batches"}  # equal tokens and evaluated bytes per trial
    assert set(context["params"]) == searched | pinned
    assert all(len(context["params"][p]["choice"]) == 1 for p in pinned)
    for space in (moe, context):
        assert space["metric"] == "val/bpb" and space["mode"] == "min"


def _lookup(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _base_pipeline_for(space: dict) -> dict:
    """A pipeline from pipelines/ that has every swept field; New-LLM spaces fall back to
    pipelines/vectorslm.yaml with its model swapped for a default New-LLM one."""
    from slmlab.config import validate_pipeline

    paths = list(space["params"])
    for pipeline in sorted((REPO / "pipelines").glob("*.yaml")):
        raw = load_yaml(pipeline)
        dumped = validate_pipeline(copy.deepcopy(raw), str(pipeline)).model_dump(mode="json")
        if all(_lookup(dumped, p) for p in paths):
            return raw
    if "model.context_dim" in paths:
        raw = load_yaml(REPO / "pipelines" / "vectorslm.yaml")
        raw["model"] = {"family": "new_llm"}
        return raw
    pytest.fail(f"no pipeline in pipelines/ has all of {paths}")


def check_space_against_pipeline(path: Path) -> None:
    """The project's own parser loads the file, and every combination of swept values (all
    choice/grid values, both ends of each range) gives a pipeline that validates."""
    from slmlab import sweep
    from slmlab.config import validate_pipeline

    sweep.load_space(path)  # raises ConfigError on anything the sweep command would reject
    space = load_yaml(path)
    base = _base_pipeline_for(space)
    axes = []
    for param, spec in space["params"].items():
        ((kind, args),) = spec.items()
        values = args if kind in ("choice", "grid") else ([args[0], args[1] - 1] if kind == "randint" else args)
        axes.append([(param, v) for v in values])
    combos = list(itertools.product(*axes))
    assert combos
    for combo in combos:
        overrides = dict(combo)
        validate_pipeline(sweep.apply_overrides(base, overrides), f"{path.name} {overrides}")


@pytest.mark.parametrize("path", SEARCH_SPACES, ids=lambda p: p.name)
def test_search_space_is_accepted_by_the_sweep_command_and_pipeline_schema(path):
    pytest.importorskip("slmlab.sweep")
    check_space_against_pipeline(path)


def test_search_space_with_impossible_combination_fails(tmp_path):
    pytest.importorskip("slmlab.sweep")
    from slmlab.config import ConfigError

    space = load_yaml(REPO / "search_spaces" / "moe.yaml")
    space["params"]["model.moe.top_k"] = {"choice": [1, 8]}  # 8 > every num_experts choice
    bad = tmp_path / "moe.yaml"
    bad.write_text(yaml.safe_dump(space))
    check_search_space(space)  # well-formed on its own...
    with pytest.raises(ConfigError, match="top_k"):
        check_space_against_pipeline(bad)  # ...but not a valid pipeline


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["params"].update({"model.moe.top_k": {"choise": [1, 2]}}), "unknown distribution"),
        (lambda s: s["params"].update({"lr": {"loguniform": [1e-4, 1e-2]}}), "dotted"),
        (lambda s: s["params"].update({"model.lr": {"loguniform": [0, 1e-2]}}), "low > 0"),
        (lambda s: s["params"].update({"model.lr": {"uniform": [2.0, 1.0]}}), "low < high"),
        (lambda s: s["params"].update({"model.x": {"choice": [1], "grid": [2]}}), "exactly one"),
        (lambda s: s["params"].update({"model.x": {"randint": [1.5, 3]}}), "ints"),
        (lambda s: s.update({"mode": "minimise"}), "mode"),
        (lambda s: s.update({"num_samples": 0}), "num_samples"),
        (lambda s: s.update({"searcher": "optuna"}), "top-level keys"),
    ],
)
def test_corrupted_search_space_fails(tmp_path, mutate, message):
    src = REPO / "search_spaces" / "moe.yaml"
    dst = tmp_path / "moe.yaml"
    shutil.copy(src, dst)
    space = load_yaml(dst)
    mutate(space)
    dst.write_text(yaml.safe_dump(space))
    with pytest.raises(ValueError, match=message):
        check_search_space(load_yaml(dst))
