from pathlib import Path

import pytest

from crossrank.config import load_params
from crossrank.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_load_for_every_profile() -> None:
    for profile in ("smoke", "default", "full"):
        params = load_params(REPO_PARAMS, profile)
        assert params.profile == profile


def test_profile_overrides_only_its_section() -> None:
    smoke = load_params(REPO_PARAMS, "smoke")
    default = load_params(REPO_PARAMS, "default")
    assert smoke.data.max_queries == 600
    assert default.data.max_queries is None
    assert smoke.split == default.split


def test_unknown_profile_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_params(REPO_PARAMS, "huge")
    assert str(raised.value) == (
        "unknown profile 'huge': choose one of smoke, default, full "
        "(the `profile` key of params.yaml or --profile)"
    )


def test_unknown_adapter_message(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  adapter: amazon\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid parameters in .*params.yaml \(profile default\): data.adapter: Input should be 'homedepot', 'crowdflower' or 'generic'"):
        load_params(path)


def test_misspelled_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  trian: 0.8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"split.trian: Extra inputs are not permitted"):
        load_params(path)


def test_missing_params_file_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"parameter file not found: .*nothing.yaml; run crossrank from the project root or pass --params PATH"):
        load_params(tmp_path / "nothing.yaml")
