"""Bad inputs a user will try, through the real CLI: exit 2, one line naming the problem, no
traceback, and nothing half-written (no run folder entries, no MLflow run, the user's files intact).

Config, generate and export cases run in the fast tier (CliRunner); data cases run `slmlab run` in
a subprocess as a user would (slow tier: each starts its own local Ray), under a memory watchdog so
that a reader loading a whole 2 GB line cannot take the machine down.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slmlab.cli import app
from tests.conftest import tiny_pipeline_dict


def invoke(*args: str):
    # SLMLAB_VERBOSE restored afterwards whatever the command does with it
    return CliRunner().invoke(app, list(args), env={"SLMLAB_VERBOSE": None})


def assert_one_line_error(result, *expected: str) -> str:
    """Exit 2, stderr exactly one line holding every ``expected`` fragment, no traceback anywhere."""
    output = result.stdout + result.stderr
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert "Traceback" not in output and "──" not in output, output  # neither plain nor Rich tracebacks
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_pipeline(folder: Path, **overrides) -> Path:
    raw = tiny_pipeline_dict(folder, **overrides)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_nothing_written(run_dir: Path) -> None:
    """A pipeline that failed on its data left no run behind: no MLflow run or experiment, no run
    state, no model, no Ray Train storage, no (partial) shard cache."""
    if (run_dir / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
        experiments = client.search_experiments()
        assert [e.name for e in experiments] == ["Default"], [e.name for e in experiments]
        assert client.search_runs([e.experiment_id for e in experiments]) == []
    for sub in ("state", "models", "ray"):
        assert not (run_dir / sub).exists(), sub
    cache = run_dir / "cache" / "data"
    assert not cache.exists() or list(cache.iterdir()) == [], list(cache.iterdir())


# ----------------------------------------------------------------------------------------------
# Config


def test_yaml_with_a_tab_indent(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("name: tiny\nmodel:\n\tfamily: vectorslm\n")
    line = assert_one_line_error(invoke("validate", str(path)), str(path), "line 3", "expected valid YAML")
    assert "'\\t'" in line  # names the tab
    assert_one_line_error(invoke("run", str(path)), str(path), "line 3")
    assert not (tmp_path / "runs").exists()


def test_set_to_a_field_that_does_not_exist(tmp_path):
    path = write_pipeline(tmp_path)
    assert_one_line_error(invoke("validate", str(path), "--set", "train.no_such_field=3"),
                          str(path), "train.no_such_field", "unknown key")
    assert_one_line_error(invoke("run", str(path), "--set", "train.no_such_field=3"), "train.no_such_field")
    assert not (tmp_path / "runs").exists()


def test_verbose_shows_the_traceback_instead(tmp_path):
    from slmlab.config import ConfigError

    path = tmp_path / "tabs.yaml"
    path.write_text("model:\n\tfamily: vectorslm\n")
    result = CliRunner().invoke(app, ["--verbose", "validate", str(path)], env={"SLMLAB_VERBOSE": None})
    assert isinstance(result.exception, ConfigError) and result.exit_code == 1
    assert os.environ.get("SLMLAB_VERBOSE") is None  # restored by the runner, set during the command
    result = CliRunner().invoke(app, ["validate", str(path)], env={"SLMLAB_VERBOSE": "1"})
    assert isinstance(result.exception, ConfigError)


def _ray_wrapped(cause: Exception) -> Exception:
    """The exception ray.get raises for a task that raised ``cause``: RayTaskError and cause's class at once."""
    from ray.exceptions import RayTaskError

    try:
        raise cause
    except Exception as err:
        import traceback

        return RayTaskError("read_source", traceback.format_exc(), err).as_instanceof_cause()


def test_deliberate_errors_are_recognised_through_ray_wrappers():
    from ray.exceptions import UserCodeException

    from slmlab.config import ConfigError
    from slmlab.errors import DataError, RegistryError, user_error

    msg = "data.sources[0] (text /x/nope.txt): expected a file, folder or glob, found no such path"
    assert str(user_error(FileNotFoundError(msg))) == msg  # the data code's builtin types, by message
    assert user_error(ValueError("data: expected documents on both sides of the split")) is not None
    wrapped = _ray_wrapped(DataError(msg))
    assert isinstance(wrapped, DataError) and str(wrapped) != msg  # a trace, what the CLI must not print
    assert str(user_error(wrapped)) == msg
    assert str(user_error(_ray_wrapped(ValueError(msg)))) == msg
    try:
        raise UserCodeException("UDF failed to process a data block.") from ValueError(msg)
    except UserCodeException as err:
        assert str(user_error(err)) == msg
    assert isinstance(user_error(ConfigError("x.yaml: train.lr: expected > 0, found -1")), ConfigError)
    assert isinstance(user_error(RegistryError("models:/x/1: not found")), RegistryError)
    # anything else is a bug and keeps its traceback
    assert user_error(ValueError("shapes (3,) and (4,) not aligned")) is None
    assert user_error(_ray_wrapped(KeyError("input_ids"))) is None
    assert user_error(RuntimeError("data: packing lost tokens")) is None  # an internal invariant, not input


def test_cli_prints_a_ray_wrapped_data_error_as_one_line(tmp_path, monkeypatch):
    import slmlab.pipeline
    from slmlab.errors import DataError

    msg = "data.sources[0] (text /x/huge.txt): expected lines under 64 MiB, found one of 2 GiB"

    def failing(*args, **kwargs):
        raise _ray_wrapped(DataError(msg))

    monkeypatch.setattr(slmlab.pipeline, "run_stages", failing)
    line = assert_one_line_error(invoke("run", str(write_pipeline(tmp_path))))
    assert line == msg
    bug = KeyError("input_ids")
    monkeypatch.setattr(slmlab.pipeline, "run_stages", lambda *a, **k: (_ for _ in ()).throw(bug))
    result = invoke("run", str(write_pipeline(tmp_path)))
    assert result.exception is bug and result.exit_code == 1  # a bug is not dressed up as a user error


def test_a_terminated_run_marks_its_mlflow_runs_killed(tmp_path, monkeypatch):
    """SIGTERM (``kill``, ``ray job stop``) mid-pipeline: this invocation's RUNNING runs become KILLED,
    exit 130; finished runs, older runs and other pipelines' runs are left as they were."""
    import slmlab.pipeline
    from slmlab.tracking import client_for, ensure_experiment

    path = write_pipeline(tmp_path)
    run_dir = yaml.safe_load(path.read_text())["run_dir"]
    client = client_for(run_dir)
    exp = ensure_experiment(client, "tiny", run_dir)
    older = client.create_run(exp, start_time=int(time.time() * 1000) - 3_600_000, tags={"slmlab.pipeline": "tiny"})
    made = {}

    def interrupted(*args, **kwargs):
        for name, pipeline in (("mine", "tiny"), ("done", "tiny"), ("other", "another")):
            made[name] = client.create_run(exp, tags={"slmlab.pipeline": pipeline}).info.run_id
        client.set_terminated(made["done"], "FINISHED")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not interrupt the pipeline")

    monkeypatch.setattr(slmlab.pipeline, "run_stages", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = invoke("run", str(path))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 130, (result.output, result.exception)
    assert "1 MLflow run(s) of this invocation marked KILLED" in result.stderr
    status = lambda run_id: client.get_run(run_id).info.status
    assert [status(made[k]) for k in ("mine", "done", "other")] == ["KILLED", "FINISHED", "RUNNING"]
    assert status(older.info.run_id) == "RUNNING"


# ----------------------------------------------------------------------------------------------
# generate / export


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A real (untrained) VectorSLM folder: model.safetensors, model_config.json, tokenizer.json."""
    import torch

    from slmlab.data.tokenizer import train_bpe
    from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig
    from slmlab.train.checkpoint import write_model

    folder = tmp_path_factory.mktemp("cli") / "model"
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=280, min_frequency=1,
                    out=folder / "tokenizer.json")
    from slmlab.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = VectorSLMConfig(vocab_size=load_tokenizer(tok).get_vocab_size(), max_seq_len=16, dim=32, n_layers=1,
                          n_heads=2, n_kv_heads=2)
    write_model(VectorSLM(cfg), cfg, folder)
    return folder


def test_generate_with_a_prompt_longer_than_max_seq_len(model_folder):
    long_prompt = "the quick brown fox " * 20
    assert_one_line_error(invoke("generate", str(model_folder), "--prompt", long_prompt),
                          "--prompt", "max_seq_len=16")
    assert_one_line_error(invoke("generate", str(model_folder), "--prompt", "the fox", "-n", "64"),
                          "--max-new-tokens", "max_seq_len=16")
    ok = invoke("generate", str(model_folder), "--prompt", "the fox", "-n", "8", "-t", "0")
    assert ok.exit_code == 0, ok.output
    fits = invoke("generate", str(model_folder), "--prompt", "the fox", "-t", "0")  # no -n: what fits, not 64
    assert fits.exit_code == 0 and fits.stdout.startswith("the fox"), (fits.output, fits.exception)


def test_generate_streams_the_tokens_of_the_saved_model(model_folder):
    """The CLI decodes from decode_layout's copy (wide weights stored (in, out), faster on CPU): greedy, it
    prints exactly what generate() gives with the model as loaded."""
    import torch

    from slmlab.data.tokenizer import END_TURN, EOS, load_tokenizer
    from slmlab.generation import generate
    from slmlab.train.checkpoint import load_model_dir

    _, net = load_model_dir(model_folder)
    tok = load_tokenizer(model_folder / "tokenizer.json")
    ids = torch.tensor([tok.encode("the fox", add_special_tokens=False).ids])
    stops = [tok.token_to_id(EOS), tok.token_to_id(END_TURN)]
    new = generate(net, ids, 8, temperature=0, stop_token_ids=stops)[0, ids.size(1):].tolist()
    want = "the fox" + tok.decode(new)  # a stop token, if any, decodes to nothing
    out = invoke("generate", str(model_folder), "--prompt", "the fox", "-n", "8", "-t", "0")
    assert out.exit_code == 0, (out.output, out.exception)
    assert out.stdout.rstrip("\n") == want


def test_generate_int8_streams_from_the_quantised_model(model_folder):
    """--int8 decodes with int8 weights (fbgemm): the same prompt, a continuation of the asked length."""
    fp32 = invoke("generate", str(model_folder), "--prompt", "the fox", "-n", "6", "-t", "0")
    int8 = invoke("generate", str(model_folder), "--prompt", "the fox", "-n", "6", "-t", "0", "--int8")
    assert int8.exit_code == 0, (int8.output, int8.exception)
    assert int8.stdout.startswith("the fox") and len(int8.stdout) > len("the fox")
    assert fp32.exit_code == 0 and fp32.stdout.startswith("the fox")


def test_generate_a_model_that_is_not_registered(tmp_path):
    run_dir = tmp_path / "runs"
    assert_one_line_error(invoke("generate", "models:/nope/1", "--prompt", "hi", "--run-dir", str(run_dir)),
                          "models:/nope/1", "no MLflow store")
    assert not run_dir.exists()  # looking a model up never creates a store
    from slmlab.tracking import client_for

    client_for(run_dir).search_experiments()  # now an (empty) store exists
    assert_one_line_error(invoke("generate", "models:/nope/1", "--prompt", "hi", "--run-dir", str(run_dir)),
                          "models:/nope/1", "expected a registered model")
    assert_one_line_error(invoke("generate", str(tmp_path / "no_such_folder"), "--prompt", "hi"), "no_such_folder")


def test_export_into_a_folder_that_already_holds_files(model_folder, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_one_line_error(invoke("export", str(model_folder), str(out)), str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    ok = invoke("export", str(model_folder), str(out), "--force")
    assert ok.exit_code == 0, ok.output
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# Data: `slmlab run` in a subprocess, exactly as a user runs it (its own local Ray, its own output)

# Per process, not summed over the tree: a local Ray at rest is 1.5-4 GiB summed (more processes on
# bigger machines, shared pages counted in each), while its largest process stays under ~1 GiB. A 2 GiB
# line read into memory puts one process over this.
RSS_BUDGET = int(1.75 * 2**30)


def _largest_rss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    largest = 0
    for p in procs:
        try:
            largest = max(largest, p.memory_info().rss)
        except psutil.Error:
            pass
    return largest


def run_cli(*args: str, cwd: Path) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS of its largest process) of `slmlab ARGS` in a subprocess; its
    whole process tree (driver, Ray, workers) is killed once one of its processes holds more than RSS_BUDGET."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("SLMLAB_VERBOSE", None)
    proc = subprocess.Popen([sys.executable, "-m", "slmlab.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, _largest_rss(proc.pid))
            if peak > RSS_BUDGET:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err, peak


def assert_run_fails_in_one_line(tmp_path: Path, pipeline: Path, *expected: str) -> None:
    rc, out, err, peak = run_cli("run", str(pipeline), cwd=tmp_path)
    assert peak <= RSS_BUDGET, f"killed at {peak / 2**30:.1f} GiB RSS: the input was read into memory"
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr, e.g. {lines[:3]}"
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    extra = [line for line in out.splitlines() if not line.startswith("[slmlab] ")]
    assert extra == [], extra  # stdout holds our progress lines only
    assert_nothing_written(tmp_path / "runs")


def _text_source(tmp_path: Path, name: str, content: bytes) -> Path:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    return write_pipeline(tmp_path, data__sources=[{"kind": "text", "path": str(corpus)}])


@pytest.mark.slow
@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", b"", ("data.sources[0]", "empty.txt", "expected usable documents", "empty file")),
    ("blank.txt", b"  \n\t\n   \n\n", ("data.sources[0]", "blank.txt", "expected usable documents", "empty file")),
    ("latin1.txt", "caf\u00e9 cr\u00e8me\nna\u00efve r\u00e9sum\u00e9\n".encode("latin-1"),
     ("data.sources[0]", "latin1.txt", "expected usable documents", "not UTF-8", "0xe9")),
], ids=["empty", "whitespace-only", "not-utf8"])
def test_run_on_a_corpus_with_no_usable_text(tmp_path, name, content, expected):
    assert_run_fails_in_one_line(tmp_path, _text_source(tmp_path, name, content), *expected)


@pytest.mark.slow
def test_run_on_a_missing_corpus(tmp_path):
    path = write_pipeline(tmp_path, data__sources=[{"kind": "text", "path": str(tmp_path / "nope.txt")}])
    assert_run_fails_in_one_line(tmp_path, path, "data.sources[0]", "nope.txt", "found no such path")


@pytest.mark.slow
def test_run_on_a_2gb_single_line_corpus(tmp_path):
    """The answer must come without holding the 2 GiB line in memory (see run_cli's watchdog)."""
    corpus = tmp_path / "huge.txt"
    with open(corpus, "wb") as f:
        f.write(b"one line without an end ")
        f.truncate(2 * 2**30)  # sparse: 2 GiB long, nearly nothing on disk
    path = write_pipeline(tmp_path, data__sources=[{"kind": "text", "path": str(corpus)}])
    assert_run_fails_in_one_line(tmp_path, path, "data.sources[0]", "huge.txt")
