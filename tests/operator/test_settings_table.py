"""Settings have one source (issue 9 item 10): the fields' descriptions. The README's table is
generated from them and the chart only sets variables that exist; both fail here when they drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optimodel_operator.settings import (TABLE_END, TABLE_START, Settings, SettingsError, env_names,
                                         settings_table)

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_generated_from_the_settings():
    text = (ROOT / "README.md").read_text()
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == settings_table(), "regenerate it: python -m optimodel_operator.settings"


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
