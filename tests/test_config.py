"""Config loading: YAML + dotted overrides validated against the dataclass schema, one-line errors."""

from __future__ import annotations

import pytest

from hpckd.train.experiment import load_experiment
from hpckd.errors import ConfigError


def test_yaml_and_overrides_merge_with_types(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 0.2\n  epochs: 3\ndata:\n  loader: torch\n")
    cfg = load_experiment(path, ["optim.lr=0.05", "teachers=[{checkpoint: a.pt, aug: strong}]"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3 and cfg.data.loader == "torch"
    assert cfg.teachers[0].checkpoint == "a.pt" and cfg.teachers[0].aug == "strong"
    assert cfg.data.batch_size == 64  # untouched default


def test_unknown_key_names_key_and_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["optim.lrr=0.1"])
    assert "unknown key 'optim.lrr'" in str(err.value) and "did you mean 'optim.lr'" in str(err.value)
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  batchsize: 32\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert "data.batchsize" in str(err.value) and "data.batch_size" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["optim.epochs=ten"])
    assert "'optim.epochs' expects int" in str(err.value) and "ten" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["optim.lr=fast"])
    assert "'optim.lr' expects float" in str(err.value)


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["data.loader=pil"])
    assert "'data.loader'" in str(err.value) and "dali, torch" in str(err.value)
    with pytest.raises(ConfigError, match="teachers\\[0\\].aug"):
        load_experiment(None, ["teachers=[{checkpoint: a.pt, aug: medium}]"])


def test_missing_file_and_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_experiment(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="teachers\\[0\\].checkpoint|checkpoint"):
        load_experiment(None, ["teachers=[{aug: weak}]"])
