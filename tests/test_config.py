"""Pipeline config validation: every error names the file, the field path, expected and found."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmlab.config import ConfigError, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, raw) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return p


def error_lines(path, overrides=()):
    with pytest.raises(ConfigError) as exc:
        load_pipeline(path, overrides)
    return str(exc.value).splitlines()


def test_shipped_pipelines_validate():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        cfg = load_pipeline(path)
        assert cfg.name and cfg.model.family


def test_unknown_key_is_rejected_with_its_path(tmp_path, tiny_pipeline):
    raw = tiny_pipeline()
    raw["train"]["learning_rate"] = 0.1
    (line,) = error_lines(write(tmp_path, raw))
    assert line.startswith(f"{tmp_path / 'pipe.yaml'}: train.learning_rate: expected no such field")
    assert "found 0.1" in line


def test_wrong_type_names_expected_and_found(tmp_path, tiny_pipeline):
    raw = tiny_pipeline(train__max_steps="many")
    (line,) = error_lines(write(tmp_path, raw))
    assert ": train.max_steps: expected a valid integer" in line and "found 'many'" in line


def test_heads_must_divide_width(tmp_path, tiny_pipeline):
    (line,) = error_lines(write(tmp_path, tiny_pipeline(model__n_heads=5)))
    assert line.endswith("model.n_heads: expected a divisor of dim=32, found 5")


def test_kv_heads_must_divide_heads(tmp_path, tiny_pipeline):
    (line,) = error_lines(write(tmp_path, tiny_pipeline(model__n_kv_heads=3)))
    assert line.endswith("model.n_kv_heads: expected a divisor of n_heads=4, found 3")


def test_sequence_longer_than_model_limit(tmp_path, tiny_pipeline):
    (line,) = error_lines(write(tmp_path, tiny_pipeline(data__seq_len=128)))
    assert line.endswith("data.seq_len: expected at most model.max_seq_len=64, found 128")


def test_unknown_family(tmp_path, tiny_pipeline):
    (line,) = error_lines(write(tmp_path, tiny_pipeline(model__family="transformer-xl")))
    assert ": model: expected family one of" in line and "found 'transformer-xl'" in line


def test_several_problems_are_all_reported(tmp_path, tiny_pipeline):
    raw = tiny_pipeline(model__n_heads=5, train__lr=-1)
    raw["bogus"] = 1
    lines = error_lines(write(tmp_path, raw))
    assert len(lines) == 3
    assert {ln.split(": ")[1] for ln in lines} == {"model.n_heads", "train.lr", "bogus"}


def test_set_override_is_validated_too(tmp_path, tiny_pipeline):
    path = write(tmp_path, tiny_pipeline())
    assert load_pipeline(path, ["train.max_steps=3"]).train.max_steps == 3
    (line,) = error_lines(path, ["model.n_kv_heads=3"])
    assert "model.n_kv_heads: expected a divisor" in line
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_pipeline(path, ["train.max_steps"])


def test_bad_yaml_and_missing_file(tmp_path):
    (line,) = error_lines(write(tmp_path, "name: x\nmodel: [unclosed\n"))
    assert "pipe.yaml: line" in line and "expected valid YAML" in line
    (line,) = error_lines(tmp_path / "nope.yaml")
    assert line.endswith("nope.yaml: <file>: expected a pipeline YAML file, found no such file")


def test_impossible_train_combination(tmp_path, tiny_pipeline):
    (line,) = error_lines(write(tmp_path, tiny_pipeline(train__offload_optimizer=True, train__zero_stage=0)))
    assert line.endswith(
        "train.offload_optimizer: expected zero_stage >= 1 to offload optimizer states, found zero_stage=0"
    )
