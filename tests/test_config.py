"""Job configs: strict keys, one-line errors naming file and key, safe identifiers, docs in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from batchml.config import JobConfig, load_job_config, parse_job_config, read_yaml, reference_markdown
from batchml.errors import ConfigError
from batchml.storage.warehouse import quote_ident, quote_table
from conftest import REPO, job_config


def test_the_shipped_config_loads_and_keeps_defaults_for_what_it_omits():
    config = load_job_config(REPO / "configs" / "vuln_risk.yaml")
    assert config.scores_table == "scores.vuln_risk"
    assert config.notify.on == ["drift", "promotion", "failure"]  # `on:` stays a key under YAML 1.2 booleans
    assert config.scoring.engine == "auto" and config.promotion.require_significance


def test_only_job_source_features_and_label_are_required():
    minimal = {k: job_config()[k] for k in ("job", "source", "features", "label")}
    config = parse_job_config(minimal, Path("configs/vuln_risk.yaml"))
    assert config.training.window_days == 180 and config.drift.numeric_method == "psi"
    for key in ("job", "source", "features", "label"):
        broken = {k: v for k, v in minimal.items() if k != key}
        with pytest.raises(ConfigError, match=rf"configs/vuln_risk.yaml: {key}: required key is missing"):
            parse_job_config(broken, Path("configs/vuln_risk.yaml"))


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("drift", "psi_treshold", 0.1, "drift.psi_treshold: unknown key"),
        ("validation", "max_quarantine_fraction", 1.5, "validation.max_quarantine_fraction: Input should be less than or equal to 1"),
        ("source", "table", "raw.x; DROP TABLE y", "source.table"),
        ("promotion", "guard", {"accuracy": 0.1}, "unknown guard metric"),
        ("scoring", "reason_bands", ["critical"], "not bands"),
        ("validation", "ranges", {"ecosystem": [0, 1]}, "numeric features only"),
        ("scoring", "bands", {"high": 1.5, "medium": 0.2}, "band thresholds are probabilities in (0, 1]"),
        ("features", "numeric", [*job_config()["features"]["numeric"], "exploited_30d"], "the job's label.column: a model must not learn"),
        ("features", "categorical", ["ecosystem", "finding_id"], "the job's source.entity_id"),
    ],
)
def test_errors_name_the_key_and_the_problem(section, field, value, message):
    data = job_config()
    data[section][field] = value
    with pytest.raises(ConfigError) as caught:
        parse_job_config(data, Path("configs/vuln_risk.yaml"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_check_across_sections_is_reported_by_its_own_keys():
    data = job_config()
    data["validation"]["ranges"] = {"nope": [0, 1]}
    with pytest.raises(ConfigError) as caught:
        parse_job_config(data, Path("configs/vuln_risk.yaml"))
    assert str(caught.value) == "configs/vuln_risk.yaml: validation.ranges names ['nope'], which are not features"


def test_feature_sql_may_end_with_a_semicolon_and_comment_lines(tmp_path):
    from batchml.config import feature_sql

    config = parse_job_config({**job_config(), "features": {**job_config()["features"], "sql": "f.sql"}}, Path("c.yaml"))
    (tmp_path / "f.sql").write_text("-- derived features\nSELECT *, 1 AS one FROM source -- all rows\n;\n\n-- end of file\n")
    assert feature_sql(tmp_path, config) == "-- derived features\nSELECT *, 1 AS one FROM source -- all rows"


def test_yaml_12_booleans_and_error_lines(tmp_path):
    assert read_yaml("on: [drift]\nyes: no\n") == {"on": ["drift"], "yes": "no"}
    assert read_yaml("flag: true") == {"flag": True}
    path = tmp_path / "vuln_risk.yaml"
    path.write_text("job: vuln_risk\nsource:\n  table: [\n")
    with pytest.raises(ConfigError, match=r"vuln_risk.yaml: line \d+: invalid YAML"):
        load_job_config(path)
    path.write_text(yaml.safe_dump(job_config(job="other")))
    with pytest.raises(ConfigError, match="job: is 'other' but the file is named vuln_risk.yaml"):
        load_job_config(path)


@pytest.mark.parametrize("name", ["x; DROP TABLE t", 'a"b', "1abc", "", "a b", "é"])
def test_identifiers_that_could_inject_sql_are_refused(name):
    with pytest.raises(ValueError):
        quote_ident(name)
    with pytest.raises(ValueError):
        quote_table(f"raw.{name}")


def test_identifiers_are_quoted():
    assert quote_ident("epss") == '"epss"'
    assert quote_table("raw.vuln_findings") == '"raw"."vuln_findings"'


def test_readme_config_reference_is_generated_from_the_code():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", readme, re.S).group(1)
    assert block == reference_markdown(), "run: python -m batchml.config and paste the table into README.md"
    for name in JobConfig.model_fields:
        assert f"`{name}" in block
