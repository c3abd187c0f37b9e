"""The schedule daemon and the cron wrapper, with real processes.

Daemon tests start ``python -m batchml.cli schedule`` with ``BATCHML_SCHEDULE_FIRE_NOW=1`` so each
job fires at once. To hold a run open for a known time they put a ``sitecustomize.py`` on
PYTHONPATH that, only in the child ``batchml ... run JOB``, records its pid and environment and
sleeps (and optionally exits) before batchml starts: the daemon's own code runs unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from batchml.config import read_yaml
from batchml.errors import BatchMLError, ConfigError, DataError, LockError, RejectedError
from batchml.pipeline.locks import job_lock
from batchml.project import Project
from batchml.pipeline.scheduler import MISFIRE_GRACE_TIME, Children, build_scheduler, crontab_weekdays, describe_exit

REPO = Path(__file__).resolve().parents[1]
RUN_JOB = REPO / "cron" / "run-job"
UTC = timezone.utc

# Runs only in a child `python -m batchml.cli ... run JOB`, never in the daemon.
SITECUSTOMIZE = """
import json, os, sys, time
if len(sys.orig_argv) > 2 and sys.orig_argv[-2] == "run" and os.environ.get("TEST_CHILD_MARKER"):
    marker = os.environ["TEST_CHILD_MARKER"]
    temporary = f"{marker}.{os.getpid()}.tmp"  # two children at once must not write one file together
    with open(temporary, "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.orig_argv, "smtp_host": os.environ.get("BATCHML_SMTP_HOST")}, f)
    os.replace(temporary, marker)
    release = os.environ.get("TEST_CHILD_UNTIL")  # a file the test creates when the run may end
    deadline = time.monotonic() + float(os.environ.get("TEST_CHILD_SLEEP", "0" if not release else "300"))
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.05)
    if os.environ.get("TEST_CHILD_EXIT"):
        os._exit(int(os.environ["TEST_CHILD_EXIT"]))
"""


def write_job(root: Path, job: str, cron: str = "0 2 * * *", tz: str = "UTC") -> None:
    """configs/<job>.yaml: the repo's vuln_risk config under another name and schedule, mailing no one."""
    config = read_yaml((REPO / "configs" / "vuln_risk.yaml").read_text())
    config.update(job=job, schedule={"cron": cron, "timezone": tz}, notify={"email": []})
    config["scoring"]["table"] = f"scores.{job}"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / f"{job}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def project_with(tmp_path: Path, **jobs: tuple[str, str]) -> Project:
    for job, (cron, tz) in jobs.items():
        write_job(tmp_path, job, cron, tz)
    return Project.open(tmp_path)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- build_scheduler -------------------------------------------------------------------------------


def test_trigger_follows_the_yaml_in_its_time_zone(tmp_path):
    project = project_with(tmp_path, berlin=("0 2 * * *", "Europe/Berlin"), nightly=("30 4 * * *", "UTC"))
    scheduler, names = build_scheduler(project, [])
    assert names == ["berlin", "nightly"]
    job = scheduler.get_job("berlin")
    fields = {f.name: str(f) for f in job.trigger.fields}
    assert (fields["minute"], fields["hour"], str(job.trigger.timezone)) == ("0", "2", "Europe/Berlin")
    assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, MISFIRE_GRACE_TIME)
    winter = job.trigger.get_next_fire_time(None, datetime(2026, 1, 15, 12, tzinfo=UTC))
    summer = job.trigger.get_next_fire_time(None, datetime(2026, 7, 15, 12, tzinfo=UTC))
    assert winter.astimezone(UTC) == datetime(2026, 1, 16, 1, tzinfo=UTC)  # CET = UTC+1
    assert summer.astimezone(UTC) == datetime(2026, 7, 16, 0, tzinfo=UTC)  # CEST = UTC+2
    scheduler.start(paused=True)  # computes next run times, fires nothing
    try:
        assert str(scheduler.get_job("berlin").next_run_time.tzinfo) == "Europe/Berlin"
        assert scheduler.get_job("nightly").next_run_time.strftime("%H:%M") == "04:30"
    finally:
        scheduler.shutdown(wait=False)


def fire_times(trigger, after: datetime, count: int) -> list[datetime]:
    """The trigger's next ``count`` fire times after ``after``, in UTC, as the scheduler steps through them."""
    times, previous, now = [], None, after
    for _ in range(count):
        previous = trigger.get_next_fire_time(previous, now)
        times.append(previous.astimezone(UTC))
        now = times[-1] + timedelta(seconds=1)
    return times


def test_a_local_time_that_occurs_twice_fires_twice_and_one_that_never_occurs_fires_once(tmp_path):
    project = project_with(tmp_path, berlin=("30 2 * * *", "Europe/Berlin"))
    trigger = build_scheduler(project, [])[0].get_job("berlin").trigger
    # autumn: 02:30 comes twice on 25 October 2026 (CEST, then CET): two fires an hour apart
    autumn = fire_times(trigger, datetime(2026, 10, 24, 12, tzinfo=UTC), 3)
    assert autumn == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 1, 30, tzinfo=UTC),
                      datetime(2026, 10, 26, 1, 30, tzinfo=UTC)]
    # spring: 02:30 never comes on 29 March 2026; that night fires once, at 03:30 CEST
    spring = fire_times(trigger, datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
    assert spring == [datetime(2026, 3, 29, 1, 30, tzinfo=UTC), datetime(2026, 3, 30, 0, 30, tzinfo=UTC)]


def test_only_the_named_jobs_once_each(tmp_path):
    project = project_with(tmp_path, a=("0 2 * * *", "UTC"), b=("0 3 * * *", "UTC"))
    scheduler, names = build_scheduler(project, ["b", "b"])
    assert names == ["b"] and [j.id for j in scheduler.get_jobs()] == ["b"]


def test_weekdays_are_read_as_crontab_numbers(tmp_path):
    assert crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_weekdays("0") == crontab_weekdays("7") == crontab_weekdays("SUN") == "sun"
    assert crontab_weekdays("*/2") == "sun,tue,thu,sat"
    assert crontab_weekdays("5-7,1") == "sun,mon,fri,sat"
    assert crontab_weekdays("0-7") == "*"
    project = project_with(tmp_path, sundays=("0 2 * * 0", "UTC"))
    scheduler, _ = build_scheduler(project, [])
    wednesday = datetime(2026, 11, 25, 12, tzinfo=UTC)
    assert scheduler.get_job("sundays").trigger.get_next_fire_time(None, wednesday) == datetime(2026, 11, 29, 2, tzinfo=UTC)


@pytest.mark.parametrize(("cron", "tz", "bad"), [
    ("0 2 * *", "UTC", "schedule.cron '0 2 * *'"),
    ("61 2 * * *", "UTC", "schedule.cron '61 2 * * *'"),
    ("0 0 30 2 *", "UTC", "never fires"),
    ("0 2 1 * 1", "UTC", "not both"),
    ("0 2 * * 8", "UTC", "day of week '8'"),
    ("0 2 * * *", "Mars/Olympus_Mons", "schedule.timezone 'Mars/Olympus_Mons'"),
])
def test_bad_schedule_is_a_config_error_naming_job_and_value(tmp_path, cron, tz, bad):
    project = project_with(tmp_path, good=("0 2 * * *", "UTC"), broken=(cron, tz))
    with pytest.raises(ConfigError, match="broken") as caught:
        build_scheduler(project, [])
    assert bad in str(caught.value)


def test_no_jobs_or_unknown_job_is_a_config_error(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigError, match="no jobs to schedule"):
        build_scheduler(Project.open(tmp_path), [])
    write_job(tmp_path, "real")
    with pytest.raises(ConfigError, match="'typo'.*real"):
        build_scheduler(Project.open(tmp_path), ["typo"])


def test_exit_codes_in_words():
    # the words follow the codes the CLI exits with (batchml.errors), whatever their numbers
    assert describe_exit(0) == "ok"
    assert describe_exit(BatchMLError.exit_code) == describe_exit(DataError.exit_code) == "failed"
    assert "rejected" in describe_exit(RejectedError.exit_code)
    assert "config" in describe_exit(ConfigError.exit_code)
    assert "already running" in describe_exit(LockError.exit_code)
    assert describe_exit(42) == "failed"  # a code nobody documented: a failure, not a crash of the daemon
    assert describe_exit(-9) == "killed by SIGKILL (out of memory?)"
    assert describe_exit(-15, stopping=True) == "ended by SIGTERM at shutdown"


# --- Children: the shutdown bound -----------------------------------------------------------------


def run_in_thread(children: Children, code: str) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=children.run("job", [sys.executable, "-c", code])))
    thread.start()
    wait_until(children.running, 5, "the child to start")
    return thread, result


def test_stop_waits_for_a_child_that_finishes_within_the_grace():
    children = Children()
    thread, result = run_in_thread(children, "import time; time.sleep(0.5)")
    started = time.monotonic()
    children.stop(grace=10, kill_after=10)
    thread.join(5)
    assert result["code"] == 0 and time.monotonic() - started < 5
    assert children.run("job", [sys.executable, "-c", "pass"]) is None  # closed: nothing new starts


def test_stop_escalates_to_sigkill_for_a_child_ignoring_sigterm(tmp_path):
    children = Children()
    ready = tmp_path / "ready"
    thread, result = run_in_thread(children, "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    wait_until(ready.exists, 5, "the child to ignore SIGTERM")
    started = time.monotonic()
    children.stop(grace=0.2, kill_after=0.5)
    thread.join(5)
    assert result["code"] == -signal.SIGKILL and time.monotonic() - started < 3


# --- the daemon, as a real process -----------------------------------------------------------------


class Daemon:
    """``batchml schedule`` in a subprocess, its stderr in a file."""

    def __init__(self, root: Path, jobs: list[str], *options: str, **env: str) -> None:
        site = root / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.log = root / "daemon.log"
        self.marker = root / "child.json"
        full_env = {**os.environ, "PYTHONPATH": str(site), "BATCHML_SCHEDULE_FIRE_NOW": "1", "TEST_CHILD_MARKER": str(self.marker),
                    "BATCHML_SMTP_HOST": "smtp.invalid", **env}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "batchml.cli", "--project", str(root),
                                          *(options or ("--log-format", "plain")), "schedule", *jobs], stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def text(self) -> str:
        return self.log.read_text()

    # generous bounds: each returns as soon as the thing happens; two loaded cores can take 20 s to
    # start a daemon and a run (two Python processes importing duckdb and lightgbm)
    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.text()), timeout, f"{pattern!r} in the daemon log:\n{self.text()}")

    def child(self) -> dict:
        return wait_until(lambda: self.marker.exists() and json.loads(self.marker.read_text()), 120, "the child to start")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield lambda *args, **kwargs: started.append(Daemon(*args, **kwargs)) or started[-1]
    for daemon in started:
        daemon.kill()


def test_daemon_runs_jobs_in_children_logs_exits_and_keeps_going(tmp_path, daemons):
    project = project_with(tmp_path, failing=("0 2 * * *", "UTC"), busy=("15 3 * * *", "Europe/Berlin"))
    with job_lock(project.locks, "busy"):  # as if a manual run of busy were going on
        daemon = daemons(tmp_path, ["failing", "busy"])
        daemon.wait_for(r"busy: cron '15 3 \* \* \*' in Europe/Berlin; next run \d{4}-\d\d-\d\d \d\d:\d\d CES?T")
        daemon.wait_for(r"busy: exit 75 \(skipped: already running\) after \d+\.\d s")
        code = int(daemon.wait_for(r"failing: exit (\d+) \(\w[^)]*\) after \d+\.\d s").group(1))
    assert code not in (0, 75)  # the tmp project has no source table: the run fails, the daemon does not
    child = daemon.child()
    assert child["pid"] != daemon.proc.pid and child["argv"][-2:] == ["run", child["argv"][-1]]
    assert child["smtp_host"] == "smtp.invalid"  # the environment reaches the run
    daemon.wait_for(r"failing: next run \d{4}-\d\d-\d\d 02:00 UTC")
    assert daemon.proc.poll() is None
    assert daemon.stop(signal.SIGTERM) == 0  # nothing running: it stops at once (no wait for the next fire)
    assert "received SIGTERM: no new runs" in daemon.text() and "scheduler stopped" in daemon.text()


def test_runs_log_in_the_daemon_s_format_and_get_its_debug_flag(tmp_path, daemons):
    project_with(tmp_path, failing=("0 2 * * *", "UTC"))
    daemon = daemons(tmp_path, ["failing"], "--log-format", "json", "--debug")
    daemon.wait_for(r"failing: exit \d+")
    assert daemon.stop(signal.SIGTERM) == 0

    assert daemon.child()["argv"][-5:] == ["--log-format", "json", "--debug", "run", "failing"]
    text = daemon.text()
    assert not re.search(r"^\d{4}-\d\d-\d\dT[\d:]+ (INFO|WARNING|ERROR) ", text, re.MULTILINE), text  # no plain log line
    assert [json.loads(line) for line in text.splitlines() if line.startswith("{") and "failing: run failing-" in line], text


def test_stop_lets_a_running_child_finish_within_the_grace(tmp_path, daemons):
    project_with(tmp_path, slow=("0 2 * * *", "UTC"))
    release = tmp_path / "release"
    daemon = daemons(tmp_path, [], BATCHML_SHUTDOWN_GRACE="300", TEST_CHILD_UNTIL=str(release), TEST_CHILD_EXIT="0")
    daemon.child()  # running, and it goes on until the test says so: the SIGINT lands while it runs
    daemon.proc.send_signal(signal.SIGINT)
    daemon.wait_for("waiting up to 300 s for the running job\\(s\\) to finish: slow")
    assert daemon.proc.poll() is None  # still waiting for the child
    release.touch()
    assert daemon.proc.wait(timeout=60) == 0
    text = daemon.text()
    assert "received SIGINT" in text and re.search(r"slow: exit 0 \(ok\) after \d+\.\d s", text)


def test_stop_terminates_a_child_still_running_after_the_grace(tmp_path, daemons):
    project_with(tmp_path, stuck=("0 2 * * *", "UTC"))
    daemon = daemons(tmp_path, ["stuck"], BATCHML_SHUTDOWN_GRACE="1", TEST_CHILD_SLEEP="600")
    child = daemon.child()
    assert daemon.stop(signal.SIGTERM, timeout=120) == 0  # had it waited for the child, this would time out
    assert "still running: stuck" in daemon.text()
    assert re.search(r"stuck: exit -15 \(ended by SIGTERM at shutdown\)", daemon.text())
    with pytest.raises(ProcessLookupError):
        os.kill(child["pid"], 0)


def test_a_fire_is_skipped_while_the_previous_run_still_goes(tmp_path, monkeypatch):
    """README: "A fire that comes while the job's previous run is still going is skipped"."""
    from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES

    project = project_with(tmp_path, slow=("0 2 * * *", "UTC"))
    site, marker, release = tmp_path / "site", tmp_path / "child.json", tmp_path / "release"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for name, value in {"PYTHONPATH": str(site), "TEST_CHILD_MARKER": str(marker), "TEST_CHILD_UNTIL": str(release),
                        "TEST_CHILD_EXIT": "0"}.items():
        monkeypatch.setenv(name, value)
    scheduler, _ = build_scheduler(project, [], fire_now=True)
    skipped, finished = threading.Event(), threading.Event()
    scheduler.add_listener(lambda event: skipped.set(), EVENT_JOB_MAX_INSTANCES)
    scheduler.add_listener(lambda event: finished.set(), EVENT_JOB_EXECUTED)
    scheduler.start()
    try:
        first = wait_until(lambda: marker.exists() and json.loads(marker.read_text()), 120, "the first run to start")
        scheduler.modify_job("slow", next_run_time=datetime.now(UTC))  # the next fire comes while it runs
        assert skipped.wait(120), "the second fire was not skipped"
        assert not finished.is_set()  # the first run still goes
        release.touch()
        assert finished.wait(120)
    finally:
        release.touch()
        scheduler.shutdown(wait=True)
    assert json.loads(marker.read_text())["pid"] == first["pid"]  # no second run started


def test_cli_refuses_a_bad_time_zone_up_front(tmp_path):
    write_job(tmp_path, "vuln", tz="Europe/Atlantis")
    done = subprocess.run([sys.executable, "-m", "batchml.cli", "--project", str(tmp_path), "schedule"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "vuln" in done.stderr and "'Europe/Atlantis'" in done.stderr and "Traceback" not in done.stderr


# --- cron/run-job ---------------------------------------------------------------------------------

FAKE_BATCHML = """#!/bin/sh
echo "args: $*"
echo "a warning on stderr" >&2
exit 3
"""
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "


def fake_project(root: Path) -> Path:
    binary = root / ".venv" / "bin" / "batchml"
    binary.parent.mkdir(parents=True)
    binary.write_text(FAKE_BATCHML)
    binary.chmod(0o755)
    return root


def run_job(*args: str, script: Path = RUN_JOB, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "BATCHML_PROJECT"}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={**base, **env}, timeout=20)


def test_run_job_logs_with_timestamps_and_passes_the_exit_code(tmp_path):
    root = fake_project(tmp_path / "proj")
    first = run_job("vuln_risk", "--as-of", "2026-11-28", BATCHML_PROJECT=str(root))
    second = run_job("vuln_risk", BATCHML_PROJECT=str(root))
    assert first.returncode == second.returncode == 3
    assert "vuln_risk exited 3" in first.stderr and first.stdout == ""
    log = (root / "warehouse" / "logs" / "vuln_risk.log").read_text()
    assert re.search(STAMP + re.escape(f"args: --project {root.resolve()} --log-format plain run vuln_risk --as-of 2026-11-28"), log)
    assert re.search(STAMP + "a warning on stderr", log) and re.search(STAMP + "run-job vuln_risk: exit 3", log)
    assert log.count("args:") == 2  # appended, not overwritten


def test_run_job_finds_the_project_above_its_own_directory(tmp_path):
    root = fake_project(tmp_path / "proj")
    (root / "cron").mkdir()
    script = shutil.copy(RUN_JOB, root / "cron" / "run-job")
    assert run_job("nightly", script=Path(script)).returncode == 3
    assert "args: --project" in (root / "warehouse" / "logs" / "nightly.log").read_text()


def test_run_job_without_venv_or_with_a_bad_name_exits_2(tmp_path):
    (tmp_path / "bare" / "cron").mkdir(parents=True)  # a checkout without a venv, and no batchml on PATH
    script = Path(shutil.copy(RUN_JOB, tmp_path / "bare" / "cron" / "run-job"))
    missing = run_job("vuln_risk", script=script, BATCHML_PROJECT=str(tmp_path), PATH="/usr/bin:/bin")
    assert missing.returncode == 2 and "run make install" in missing.stderr
    root = fake_project(tmp_path / "proj")
    bad = run_job("../escape", BATCHML_PROJECT=str(root))
    assert bad.returncode == 2 and "job name" in bad.stderr
    assert not (root / "warehouse").exists()


def test_run_job_serves_a_project_without_its_own_venv(tmp_path):
    """A project made by `batchml demo --dir` has no .venv: the checkout's, or BATCHML_BIN, runs it."""
    tool = fake_project(tmp_path / "tool") / ".venv" / "bin" / "batchml"
    project = tmp_path / "demo"
    project.mkdir()
    result = run_job("vuln_risk", BATCHML_PROJECT=str(project), BATCHML_BIN=str(tool))
    assert result.returncode == 3
    assert f"args: --project {project.resolve()}" in (project / "warehouse" / "logs" / "vuln_risk.log").read_text()


def test_run_job_log_lines_carry_one_timestamp(tmp_path):
    root = fake_project(tmp_path / "proj")
    binary = root / ".venv" / "bin" / "batchml"
    binary.write_text('#!/bin/sh\necho "2026-11-28T02:00:01 INFO vuln_risk: extracted 5 rows" >&2\nexit 0\n')
    assert run_job("vuln_risk", BATCHML_PROJECT=str(root)).returncode == 0
    log = (root / "warehouse" / "logs" / "vuln_risk.log").read_text()
    line = next(line for line in log.splitlines() if "extracted" in line)
    assert re.fullmatch(STAMP + "INFO vuln_risk: extracted 5 rows", line)
