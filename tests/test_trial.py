"""``batchml try``: a proposed config through the nightly gate against the champion, writing nothing."""

from __future__ import annotations

import hashlib
import os
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from batchml.demo import data as demo_data
from batchml.config import load_job_config
from batchml.pipeline.nightly import run_job
from conftest import REPO, START, DemoProject, copy_project, day, job_config, load_source

# Small test models score a row in a few µs: the speed test by ratio would judge timer noise, so it is
# floored here (as README advises for small models); the ratio itself is still reported.
FAST = {"latency_floor_us": 1000.0, "min_improvement": 0.002, "guard": {"log_loss": 0.01}}


def without(config: dict, feature: str) -> dict:
    """``config`` without a numeric feature (and its validation entries)."""
    config["features"]["numeric"] = [n for n in config["features"]["numeric"] if n != feature]
    for key in ("ranges", "max_null_fraction"):
        config["validation"].get(key, {}).pop(feature, None)
    return config


def champion_config() -> dict:
    """The champion's config lacks epss, the strongest signal: a candidate that adds it is clearly better."""
    return without(job_config(promotion=FAST), "epss")


def write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def warehouse_state(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: its sha256 (or 'dir')."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


CHAMPION_DAY = 75


@pytest.fixture(scope="module")
def busy() -> pa.Table:
    """100 days of 200 findings a day, no shift: holdouts of ~2,800 rows, so the gate can tell models apart."""
    return demo_data.generate_findings(START, 100, seed=5, rows_per_day=200, shift_day=-1)


def with_champion(root: Path, findings: pa.Table, config: dict | None = None) -> DemoProject:
    """A warehouse whose champion v1 (default: without epss) was trained by a nightly run at ``CHAMPION_DAY``,
    published for analysts."""
    p = DemoProject(root, findings)
    p.write_config(config or champion_config())
    load_source(p.warehouse, findings)
    run_job(p.project, "vuln_risk", as_of=day(CHAMPION_DAY), notify=False)
    return p


@pytest.fixture(scope="module")
def champion(tmp_path_factory, busy) -> DemoProject:
    """``with_champion`` with the default champion config, built once for this module: tests copy it."""
    return with_champion(tmp_path_factory.mktemp("champion") / "project", busy)


@pytest.fixture(scope="module")
def project(tmp_path_factory, champion) -> DemoProject:
    p = copy_project(champion, tmp_path_factory.mktemp("trial") / "project")
    better = job_config(promotion=FAST)  # epss added back
    write_yaml(p.root / "candidates" / "vuln_risk.better.yaml", better)
    worse = without(champion_config(), "internet_exposed")
    worse["training"]["params"]["num_leaves"] = 2
    write_yaml(p.root / "candidates" / "vuln_risk.worse.yaml", worse)
    return p


def try_cli(p: DemoProject, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return p.cli("try", "vuln_risk", *args, env=env)


def test_a_candidate_with_a_useful_feature_added_passes_the_gate_and_nothing_is_written(project):
    before = warehouse_state(project.root / "warehouse")
    result = try_cli(project, "--config", str(project.root / "candidates" / "vuln_risk.better.yaml"), "--format", "json")
    after = warehouse_state(project.root / "warehouse")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["would_promote"] and data["outcome"] == "promoted" and data["exit_code"] == 0
    assert data["features"] == {"added": ["epss"], "removed": []}
    assert data["champion"]["version"] == 1 and data["candidate"]["version"] == 2
    assert data["as_of"] == day(CHAMPION_DAY).isoformat()  # default cut-off: the watermark, what the last run saw
    assert all(c["passed"] for c in data["conditions"])
    assert [c["name"] for c in data["conditions"]] == ["min_holdout_rows", "both_classes", "min_improvement", "significance",
                                                       "guard_log_loss", "latency"]
    primary = next(m for m in data["metrics"] if m["name"] == "roc_auc")
    assert primary["improvement"] == pytest.approx(primary["candidate"] - primary["champion"])
    assert data["bootstrap"]["low"] > 0 and data["bootstrap"]["difference"] == pytest.approx(primary["improvement"])
    assert data["golden_set"]["champion"]["passed"] and data["golden_set"]["champion"]["rows"] > 0
    assert data["golden_set"]["candidate"]["passed"]
    assert data["rows"]["train"] == data["rows"]["fit"] + data["rows"]["validation"] > 0
    assert 0 < data["rows"]["holdout_positives"] < data["rows"]["holdout"]
    assert before == after  # no run row, no model version, no file: byte for byte
    assert project.scalar("SELECT count(*) FROM batchml.models") == 1
    assert project.scalar("SELECT count(*) FROM batchml.runs") == 1


def test_a_worse_candidate_exits_4_naming_the_failing_condition(project):
    before = warehouse_state(project.root / "warehouse")
    result = try_cli(project, "--config", str(project.root / "candidates" / "vuln_risk.worse.yaml"))
    assert result.returncode == 4, result.stderr
    assert "FAIL  min_improvement" in result.stdout and "removed internet_exposed" in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the candidate would not pass the gate: roc_auc improvement -") and "min_improvement" in error
    assert "verdict: the gate would KEEP champion v1" in result.stdout
    assert warehouse_state(project.root / "warehouse") == before


def test_markdown_is_a_pull_request_comment_with_every_condition(project):
    result = try_cli(project, "--config", str(project.root / "candidates" / "vuln_risk.worse.yaml"), "--format", "markdown")
    assert result.returncode == 4, result.stderr
    text = result.stdout
    assert text.startswith("### ❌ `batchml try vuln_risk`: the gate would KEEP champion v1")
    assert "| metric | champion v1 | candidate (v2) | difference [bootstrap interval] |" in text
    assert "| `min_improvement` | ❌ **fail** |" in text and "| `guard_log_loss` |" in text and "| `latency` |" in text
    assert "removed `internet_exposed`" in text


def test_try_works_while_analysts_hold_the_catalog_and_the_warehouse(project):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\n"
         "cons = [duckdb.connect(path, read_only=True) for path in sys.argv[1:]]\n"
         "print('open', flush=True)\ntime.sleep(300)",
         str(project.root / "warehouse" / "catalog.duckdb"), str(project.warehouse)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        result = try_cli(project, "--config", str(project.root / "candidates" / "vuln_risk.better.yaml"),
                         env={"BATCHML_LOCK_TIMEOUT": "2"})
        assert holder.poll() is None  # still holding both files
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert result.returncode == 0, result.stderr


def test_a_run_holding_the_warehouse_makes_try_wait_then_say_who(project):
    writer = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\ncon = duckdb.connect(sys.argv[1])\nprint('open', flush=True)\ntime.sleep(300)",
         str(project.warehouse)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        result = try_cli(project, env={"BATCHML_LOCK_TIMEOUT": "1"})
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    # one line says who holds the warehouse while try waits, the last one gives up naming it
    assert lines[-1].startswith("error: ") and f"process {writer.pid}" in lines[-1] and "warehouse.duckdb" in lines[-1], result.stderr
    assert all("WARNING" in line and f"process {writer.pid}" in line for line in lines[:-1]) and len(lines) <= 2, result.stderr


def test_bad_proposals_exit_2(project):
    other_job = write_yaml(project.root / "candidates" / "other.yaml", job_config(job="churn"))
    result = try_cli(project, "--config", str(other_job))
    assert result.returncode == 2 and "job: is 'churn', not 'vuln_risk'" in result.stderr, result.stderr

    typo = job_config()
    typo["training"]["windw_days"] = 30
    result = try_cli(project, "--config", str(write_yaml(project.root / "candidates" / "typo.yaml", typo)))
    assert result.returncode == 2 and "training.windw_days" in result.stderr, result.stderr

    result = try_cli(project, "--as-of", day(CHAMPION_DAY - 1).date().isoformat())
    assert result.returncode == 2 and "before champion v1's own cut-off" in result.stderr, result.stderr

    result = try_cli(project, "--format", "html")
    assert result.returncode == 2 and "--format 'html'" in result.stderr


def test_try_is_the_nightly_gate_a_run_at_that_cut_off_applies(tmp_path, champion):
    """Same config, same cut-off: the try's decision is the one the nightly run then records."""
    p = copy_project(champion, tmp_path / "twin")
    tried = json.loads(p.cli("try", "vuln_risk", "--as-of", day(CHAMPION_DAY + 10).isoformat(), "--format", "json").stdout)
    run_job(p.project, "vuln_risk", as_of=day(CHAMPION_DAY + 10), force_retrain=True, notify=False)
    event, metrics = p.query("SELECT event, metrics FROM batchml.model_events WHERE version = 2")[0]
    recorded = json.loads(metrics)

    assert tried["candidate"]["version"] == 2 and tried["outcome"] == event
    assert tried["bootstrap"]["difference"] == pytest.approx(recorded["bootstrap"]["diff"], abs=1e-12)
    assert (tried["bootstrap"]["low"], tried["bootstrap"]["high"]) == pytest.approx(
        (recorded["bootstrap"]["low"], recorded["bootstrap"]["high"]), abs=1e-12)
    assert {m["name"]: m["candidate"] for m in tried["metrics"]} == pytest.approx(recorded["metrics_challenger"], abs=1e-12)


def test_without_a_champion_the_candidate_would_be_the_first(tmp_path, findings):
    p = DemoProject(tmp_path / "fresh", findings)
    p.write_config(job_config())
    load_source(p.warehouse, findings)
    before = warehouse_state(p.root / "warehouse")
    result = p.cli("try", "vuln_risk", "--as-of", day(60).isoformat(), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["outcome"] == "no_champion" and data["champion"] is None and data["conditions"] == []
    assert data["candidate"]["version"] == 1 and data["golden_set"]["candidate"]["passed"]
    assert data["features"] == {"added": [], "removed": []} and data["bootstrap"] is None
    assert warehouse_state(p.root / "warehouse") == before  # not even the batchml schema


def test_the_shipped_candidates_are_valid_and_the_demo_gets_them():
    for name in ("vuln_risk.better.yaml", "vuln_risk.worse.yaml"):
        shipped = REPO / "configs" / "candidates" / name
        assert load_job_config(shipped, "vuln_risk").job == "vuln_risk"
        assert shipped.read_text() == (REPO / "batchml" / "demo" / "project" / "configs" / "candidates" / name).read_text()
    sql = "jobs/vuln_risk/scanner_v1.sql"
    assert load_job_config(REPO / "configs" / "candidates" / "vuln_risk.better.yaml", "vuln_risk").features.sql == sql
    assert (REPO / sql).read_text() == (REPO / "batchml" / "demo" / "project" / sql).read_text()


def test_the_shipped_worse_candidate_is_kept_out(tmp_path, busy):
    p = with_champion(tmp_path / "shipped", busy, job_config())  # the shipped config's features
    result = try_cli(p, "--config", str(REPO / "configs" / "candidates" / "vuln_risk.worse.yaml"), "--format", "json")
    assert result.returncode == 4, result.stderr
    data = json.loads(result.stdout)
    assert not next(c for c in data["conditions"] if c["name"] == "min_improvement")["passed"]
    assert data["features"]["removed"] == ["internet_exposed"]


# -- the CI recipe ----------------------------------------------------------------------------------

CI = REPO / "docs" / "ci"


def git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, env=env)


def try_changed_jobs(p: DemoProject, base: str) -> tuple[subprocess.CompletedProcess, str]:
    """The workflow's own step: the script, from the project directory, against the base branch."""
    comment = p.root / "try-comment.md"
    result = subprocess.run(
        [str(CI / "try-changed-jobs"), base], cwd=p.root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "BATCHML_BIN": str(Path(sys.executable).parent / "batchml"), "BATCHML_COMMENT": str(comment),
             "BATCHML_THREADS": "1"})
    return result, comment.read_text()


def test_the_workflow_runs_the_tested_script():
    workflow = yaml.safe_load((CI / "try-model-change.yml").read_text())
    steps = [step.get("run", "") for step in workflow["jobs"]["try"]["steps"]]
    assert any('docs/ci/try-changed-jobs "origin/${{ github.base_ref }}"' in run for run in steps)
    assert any("gh pr comment" in run and "--body-file try-comment.md" in run for run in steps)
    assert workflow[True]["pull_request"]["paths"] == ["configs/**", "jobs/**"]  # YAML 1.1 reads `on` as True


def test_the_ci_script_checks_and_tries_each_changed_job_and_writes_the_comment(tmp_path, champion):
    p = copy_project(champion, tmp_path / "repo")
    (p.root / ".gitignore").write_text("warehouse/\ntry-comment.md\n")
    git(p.root, "init", "-q", "-b", "main")
    git(p.root, "add", "-A")
    git(p.root, "commit", "-qm", "vuln_risk as it runs")
    git(p.root, "checkout", "-qb", "add-epss")
    before = warehouse_state(p.root / "warehouse")

    untouched, comment = try_changed_jobs(p, "main")
    assert untouched.returncode == 0, untouched.stderr
    assert "nothing to try" in comment

    p.write_config(job_config(promotion=FAST))  # the pull request: epss added
    git(p.root, "commit", "-qam", "vuln_risk: add epss")
    better, comment = try_changed_jobs(p, "main")
    assert better.returncode == 0, better.stderr + comment
    assert comment.startswith("### ✅ `batchml try vuln_risk`: the gate would PROMOTE the candidate over champion v1")
    assert "added `epss`" in comment and "<code>batchml check vuln_risk</code>: ok" in comment

    worse = without(champion_config(), "internet_exposed")
    worse["training"]["params"]["num_leaves"] = 2
    p.write_config(worse)
    git(p.root, "commit", "-qam", "vuln_risk: fewer leaves, no internet_exposed")
    rejected, comment = try_changed_jobs(p, "main")
    assert rejected.returncode == 4, rejected.stderr + comment
    assert comment.startswith("### ❌ `batchml try vuln_risk`: the gate would KEEP champion v1")
    assert "| `min_improvement` | ❌ **fail** |" in comment

    p.write_config({**worse, "training": {**worse["training"], "windw_days": 3}})
    git(p.root, "commit", "-qam", "a typo")
    broken, comment = try_changed_jobs(p, "main")
    assert broken.returncode == 2, broken.stderr + comment
    assert "### ❌ `batchml check vuln_risk` failed (exit 2)" in comment and "training.windw_days" in comment
    assert warehouse_state(p.root / "warehouse") == before
