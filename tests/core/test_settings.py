from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings, load_settings, variable_names


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.http_port == 12345
    assert s.dicom_port == 11112
    assert s.ae_title == "NNUNET_NODE"
    assert s.data_dir == (tmp_path / "data").resolve()
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'nnunet-node.db'}"
    assert s.allowed_roots == [s.data_dir]
    assert s.dicom_stop_grace_s == 8.0  # under Docker's 10 s from SIGTERM to SIGKILL


def test_environment_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNUNET_SERVE_PORT", "8080")
    monkeypatch.setenv("MODEL_SERVE_SPEC", str(tmp_path / "spec.yaml"))
    monkeypatch.setenv("NNUNET_NODE_ALLOWED_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("NNUNET_NODE_ALLOWED_AES", "SCANNER1, PACS")
    s = load_settings()
    assert s.http_port == 8080
    assert s.model_serve_spec == tmp_path / "spec.yaml"
    assert s.allowed_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.allowed_calling_aes == ["SCANNER1", "PACS"]


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("NNUNET_SERVE_PORT", "not-a-port", "NNUNET_SERVE_PORT"),
        ("NNUNET_SERVE_PORT", "70000", "NNUNET_SERVE_PORT"),
        ("NNUNET_NODE_AE_TITLE", "A" * 17, "NNUNET_NODE_AE_TITLE"),
        ("NNUNET_NODE_DEVICE", "tpu", "NNUNET_NODE_DEVICE"),
        ("NNUNET_NODE_DICOM_STOP_GRACE_S", "-1", "NNUNET_NODE_DICOM_STOP_GRACE_S"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_the_readme_configuration_table_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Configuration (environment variables)")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if "|" in line}
    variables = set()
    for field in Settings.model_fields.values():
        variables |= set(variable_names(field))
    assert len(variables) >= 30
    assert variables - rows == set()


def test_variables_of_other_programs_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host's environment holds names like ``DEVICE``, ``WORKERS``, ``API_KEY`` or
    ``LOG_LEVEL`` set for other programs: the node reads only its own names, so none of them
    changes a setting or stops the node (each field's bare name, upper and lower case, is set
    to a value the field would refuse or that differs from its default)."""
    monkeypatch.chdir(tmp_path)
    default = load_settings()
    for name, field in Settings.model_fields.items():
        if name.upper() in variable_names(field):  # MODEL_SERVE_SPEC, TOTALSEG_WEIGHTS_PATH
            continue
        for variable in (name, name.upper()):
            monkeypatch.setenv(variable, "bogus-value")
    monkeypatch.setenv("API_KEY", "someone-elses-key")
    settings = load_settings()
    changed = {k: v for k, v in settings.model_dump().items() if default.model_dump()[k] != v}
    assert changed == {}
    assert settings.api_key is None
    monkeypatch.setenv("NNUNET_NODE_API_KEY", "the-nodes-key")
    monkeypatch.setenv("NNUNET_NODE_WORKERS", "3")
    settings = load_settings()
    assert (settings.api_key, settings.workers) == ("the-nodes-key", 3)
