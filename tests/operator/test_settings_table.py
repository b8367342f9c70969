"""Settings have one source (issue 9 item 10): the fields of optimodel_operator.settings (pydantic-settings).
The README's and the chart README's tables are generated from them, the chart sets exactly the variables
that name a chart value, and building settings never reads the process environment unless asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from optimodel_operator.settings import (CHART_TABLE_END, CHART_TABLE_START, TABLE_END, TABLE_START, Settings,
                                         SettingsError, chart_table, chart_values, env_names, settings_table)

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_generated_from_the_settings():
    text = (ROOT / "README.md").read_text()
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == settings_table(), "regenerate it: python -m optimodel_operator.settings"


def test_chart_readme_table_is_generated_from_the_settings():
    text = (ROOT / "charts" / "optimodel" / "README.md").read_text()
    table = text.split(CHART_TABLE_START, 1)[1].split(CHART_TABLE_END, 1)[0].strip()
    assert table == chart_table(), "regenerate it: python -m optimodel_operator.settings --chart"


def test_the_chart_sets_each_variable_from_the_value_the_settings_name():
    template = (ROOT / "charts" / "optimodel" / "templates" / "deployment.yaml").read_text()
    values = yaml.safe_load((ROOT / "charts" / "optimodel" / "values.yaml").read_text())
    set_by_chart = set(re.findall(r"- name: (OPTIMODEL_[A-Z_]+)", template))
    assert set_by_chart == set(chart_values())
    for var, path in chart_values().items():
        node = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{var}: values.yaml has no {path}"
            node = node[part]


def test_settings_never_read_the_process_environment_unless_asked(monkeypatch):
    monkeypatch.setenv("OPTIMODEL_WORKERS", "3")
    monkeypatch.setenv("KUBECONFIG", "/elsewhere")
    assert (Settings().workers, Settings().kubeconfig) == (8, "")
    assert Settings.from_env({}).workers == 8
    import os
    assert (Settings.from_env(os.environ).workers, Settings.from_env(os.environ).kubeconfig) == (3, "/elsewhere")


def test_the_chart_sets_only_variables_the_operator_reads():
    chart = (ROOT / "charts" / "optimodel" / "templates" / "deployment.yaml").read_text()
    readme = (ROOT / "charts" / "optimodel" / "README.md").read_text()
    used = set(re.findall(r"OPTIMODEL_[A-Z_]+", chart)) | set(re.findall(r"OPTIMODEL_[A-Z_]+[A-Z]", readme))
    assert used and used - env_names() == set()


def test_every_setting_has_a_description_and_a_variable():
    for name, info in Settings.model_fields.items():
        assert info.description, name
    assert len(env_names()) == len(Settings.model_fields)


@pytest.mark.parametrize("env, variable", [
    ({"OPTIMODEL_WORKERS": "0"}, "OPTIMODEL_WORKERS"),
    ({"OPTIMODEL_RESYNC_SECONDS": "soon"}, "OPTIMODEL_RESYNC_SECONDS"),
    ({"OPTIMODEL_BUILDER_RESOURCES": "{"}, "OPTIMODEL_BUILDER_RESOURCES"),
    ({"OPTIMODEL_BUILDER_TOLERATIONS": "{}"}, "OPTIMODEL_BUILDER_TOLERATIONS"),
    ({"OPTIMODEL_LOG_LEVEL": "loud"}, "OPTIMODEL_LOG_LEVEL"),
    ({"OPTIMODEL_STORE_URI": "file:///x"}, "OPTIMODEL_STORE_URI"),
    ({"OPTIMODEL_ALLOW_FILE_URIS": "yes"}, "OPTIMODEL_ALLOW_FILE_URIS"),
    ({"OPTIMODEL_NAMESPACES": "a,b", "OPTIMODEL_PEERING_PRIORITY": "high"}, "OPTIMODEL_PEERING_PRIORITY"),
])
def test_a_bad_value_names_its_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_values_from_the_environment():
    s = Settings.from_env({"OPTIMODEL_LOG_LEVEL": "debug", "OPTIMODEL_PEERING_PRIORITY": "7",
                           "OPTIMODEL_LIVENESS": "", "OPTIMODEL_BUILD_RETRY_SECONDS": "0.5"})
    assert (s.log_level, s.peering_priority, s.liveness, s.build_retry_seconds) == \
        ("DEBUG", 7, "", 0.5)
    assert Settings.from_env({}).liveness == "http://0.0.0.0:8081/healthz"
    # empty means the default everywhere else (the chart sets some variables to "")
    assert Settings.from_env({"OPTIMODEL_BUILDER_TOOLCHAIN": "", "OPTIMODEL_WORKERS": ""}).workers == 8
    s = Settings.from_env({"OPTIMODEL_NAMESPACES": "a, b,", "KUBECONFIG": "/k/config",
                           "OPTIMODEL_BUILDER_TOOLCHAIN": '{"onnx": "1.17.0"}'})
    assert (s.namespaces, s.kubeconfig, dict(s.toolchain)) == (("a", "b"), "/k/config", {"onnx": "1.17.0"})
