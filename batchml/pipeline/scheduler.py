"""``batchml schedule``: a foreground APScheduler daemon that runs each job on its ``schedule.cron``.

Each run is a child process (``python -m batchml.cli run JOB``), so a crash or a memory spike in a
run cannot take the daemon down, and the daemon never opens the warehouse: between runs it holds no
connection and no lock. The child inherits the environment (SMTP settings and all).

Guarantees:

* no overlapping runs of one job: APScheduler's ``max_instances=1`` skips a fire while the previous
  run is still going, and the job lock in the child (exit 75) covers runs started elsewhere;
* a fire missed while the daemon was busy or suspended still runs if it is at most
  :data:`MISFIRE_GRACE_TIME` late, and several missed fires run once (``coalesce``);
* SIGTERM/SIGINT stop new runs, give a running child :data:`SHUTDOWN_GRACE` seconds to finish, then
  SIGTERM it, then SIGKILL it, and the daemon exits 0.

Schedules live in memory: a fire that falls while the daemon is down is not caught up on restart.
``BATCHML_SCHEDULE_FIRE_NOW=1`` is a test and ops aid: run every job once now, then follow the
schedule. Under systemd use ``KillMode=mixed`` so that the daemon, not systemd, ends the child.

Example::

    scheduler, jobs = build_scheduler(Project.open("."), ["vuln_risk"])
    scheduler.start(paused=True)            # computes next fire times without firing
    scheduler.get_job("vuln_risk").next_run_time
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from batchml.config import JobConfig, job_names
from batchml.errors import ConfigError
from batchml.project import Project

__all__ = ["KILL_AFTER", "MISFIRE_GRACE_TIME", "SHUTDOWN_GRACE", "Children", "build_scheduler", "crontab_trigger", "crontab_weekdays",
           "describe_exit", "serve"]

log = logging.getLogger("batchml.scheduler")

MISFIRE_GRACE_TIME = 3600
"""Seconds a fire may be late (daemon busy, machine suspended) and still run."""
SHUTDOWN_GRACE = 300
"""Seconds a running child gets to finish after SIGTERM/SIGINT; env ``BATCHML_SHUTDOWN_GRACE``."""
KILL_AFTER = 10
"""Seconds between sending a child SIGTERM and sending it SIGKILL."""
GRACE_ENV = "BATCHML_SHUTDOWN_GRACE"
FIRE_NOW_ENV = "BATCHML_SCHEDULE_FIRE_NOW"

EXIT_MEANINGS = {0: "ok", 1: "failed", 2: "bad usage or config", 3: "rejected by validation", 75: "skipped: already running"}

CRON_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
               "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}


# --- triggers --------------------------------------------------------------------------------------


def _weekday_number(token: str) -> int:
    """A cron weekday as 0..7 (0 and 7 are Sunday), from a digit or a name."""
    name = token.lower()
    if name in CRON_WEEKDAYS:
        return CRON_WEEKDAYS.index(name)
    if name.isdigit() and int(name) <= 7:
        return int(name)
    raise ValueError(f"day of week {token!r} is not 0-7 or sun-sat")


def _weekday_part(part: str) -> set[int]:
    """Days (0 = Sunday) of one comma-separated part: ``*``, ``N``, ``A-B``, each optionally ``/STEP``."""
    span, slash, step_text = part.partition("/")
    if slash and not (step_text.isdigit() and int(step_text) > 0):
        raise ValueError(f"step {step_text!r} in day of week {part!r} is not a positive number")
    if span == "*":
        first, last = 0, 6
    elif "-" in span:
        first, last = (_weekday_number(t) for t in span.split("-", 1))
    else:
        first = _weekday_number(span)
        last = 6 if slash else first  # "N/STEP" means N through the end of the week
    if first > last:
        raise ValueError(f"day of week range {span!r} runs backwards")
    return {day % 7 for day in range(first, last + 1, int(step_text or 1))}


def crontab_weekdays(field: str) -> str:
    """Cron's day-of-week field as APScheduler weekday names.

    APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0 (7 is Sunday too), so
    numbers are translated to names, which both read the same way:
    ``crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"``.
    """
    days: set[int] = set()
    for part in field.split(","):
        days |= _weekday_part(part)
    return "*" if len(days) == 7 else ",".join(CRON_WEEKDAYS[d] for d in sorted(days))


def crontab_trigger(expr: str, tz: ZoneInfo) -> CronTrigger:
    """A trigger that fires when crontab would, reading ``expr`` in time zone ``tz``.

    Raises ``ValueError`` for a malformed expression, a weekday field restricted together with the
    day of month (cron ORs the two, APScheduler ANDs them: refused rather than guessed), or an
    expression that never fires (``0 0 30 2 *``).
    """
    fields = CRON_MACROS.get(expr.strip(), expr).split()
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} field(s), expected 5 (minute hour day-of-month month day-of-week)")
    minute, hour, day, month, weekday = fields
    if not day.startswith("*") and not weekday.startswith("*"):
        raise ValueError("restrict day of month or day of week, not both (cron fires when either matches)")
    trigger = CronTrigger.from_crontab(" ".join([minute, hour, day, month, crontab_weekdays(weekday)]), timezone=tz)
    if trigger.get_next_fire_time(None, datetime.now(timezone.utc)) is None:
        raise ValueError("it never fires")
    return trigger


def job_trigger(config: JobConfig) -> CronTrigger:
    """The trigger of one job, validated: errors name the job, the key and the value."""
    where = f"configs/{config.job}.yaml: schedule"
    try:
        tz = ZoneInfo(config.schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}.timezone {config.schedule.timezone!r} of job {config.job} is not a known IANA time zone; "
                          f"use e.g. UTC or Europe/Berlin") from None
    try:
        return crontab_trigger(config.schedule.cron, tz)
    except ValueError as exc:
        raise ConfigError(f"{where}.cron {config.schedule.cron!r} of job {config.job} is not usable: {exc}; "
                          f"use five crontab fields, e.g. \"0 2 * * *\"") from None


def resolve_jobs(project: Project, jobs: list[str]) -> list[str]:
    """The jobs to schedule: those named (in order, once each), or every job of the project."""
    names = list(dict.fromkeys(jobs)) or job_names(project.root)
    if not names:
        raise ConfigError(f"no jobs to schedule: {project.root / 'configs'} holds no <job>.yaml; add one or pass --project")
    return names


# --- child processes -------------------------------------------------------------------------------


class Children:
    """The child processes of the runs in flight, so that shutdown can wait for them or end them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running: dict[int, tuple[str, subprocess.Popen]] = {}
        self._closed = False

    def run(self, job: str, argv: list[str]) -> int | None:
        """Run ``argv`` to its end and return its exit code; None once :meth:`stop` has begun."""
        with self._changed:
            if self._closed:
                return None
            # A session of its own: Ctrl-C in the terminal reaches the daemon only, which then
            # decides how long the run may go on; killpg also ends anything the run started.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self._running[proc.pid] = (job, proc)
        log.info("%s: run started (pid %d)", job, proc.pid)
        try:
            return proc.wait()
        finally:
            with self._changed:
                del self._running[proc.pid]
                self._changed.notify_all()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun: signals a child gets from now on are the daemon's."""
        return self._closed

    def running(self) -> list[str]:
        """Jobs with a child process right now."""
        with self._changed:
            return [job for job, _ in self._running.values()]

    def stop(self, grace: float, kill_after: float = KILL_AFTER) -> None:
        """Start no more children; wait ``grace`` s for running ones, then SIGTERM, then SIGKILL."""
        with self._changed:
            self._closed = True
            if self._running:
                log.info("waiting up to %g s for the running job(s) to finish: %s", grace, ", ".join(self._jobs()))
            if self._changed.wait_for(lambda: not self._running, timeout=grace):
                return
            for sig, wait in ((signal.SIGTERM, kill_after), (signal.SIGKILL, 5.0)):
                log.warning("still running: %s; sending %s", ", ".join(self._jobs()), sig.name)
                self._signal(sig)
                if self._changed.wait_for(lambda: not self._running, timeout=wait):
                    return
            log.error("children did not end after SIGKILL: %s", ", ".join(self._jobs()))

    def _jobs(self) -> list[str]:
        return [f"{job} (pid {pid})" for pid, (job, _) in self._running.items()]

    def _signal(self, sig: signal.Signals) -> None:
        for pid, (_, proc) in self._running.items():
            if proc.returncode is None:  # not reaped yet, so the pid is still this child's
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass


def child_command(project: Project, job: str, options: Sequence[str] = ()) -> list[str]:
    """The command line of one run: the same interpreter, project and ``options`` (the daemon's
    ``--log-format`` and ``--debug``, so the runs' lines match the daemon's), ``batchml run JOB``."""
    return [sys.executable, "-m", "batchml.cli", "--project", str(project.root), "--warehouse", str(project.warehouse), *options,
            "run", job]


def describe_exit(code: int, *, stopping: bool = False) -> str:
    """An exit code in words: the CLI's codes, or the signal that ended the child (and who sent it)."""
    if code >= 0:
        return EXIT_MEANINGS.get(code, "failed")
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    if stopping:
        return f"ended by {name} at shutdown"
    return f"killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")


def run_scheduled(children: Children, project: Project, job: str, options: Sequence[str] = ()) -> None:
    """One fire of a job: run it in a child process (see :func:`child_command`) and log how it ended. Never raises."""
    started = time.monotonic()
    try:
        code = children.run(job, child_command(project, job, options))
    except OSError as exc:
        log.error("%s: cannot start the run: %s", job, exc)
        return
    if code is None:
        log.info("%s: not started: the scheduler is stopping", job)
        return
    meaning = describe_exit(code, stopping=children.stopping)
    expected = code == 75 or (code < 0 and children.stopping)  # nothing went wrong with the job itself
    level = logging.INFO if code == 0 else logging.WARNING if expected else logging.ERROR
    log.log(level, "%s: exit %d (%s) after %.1f s", job, code, meaning, time.monotonic() - started)


# --- the scheduler ---------------------------------------------------------------------------------


def build_scheduler(project: Project, jobs: list[str], *, children: Children | None = None, fire_now: bool = False,
                    child_options: Sequence[str] = ()) -> tuple[BackgroundScheduler, list[str]]:
    """A configured, not yet started scheduler with one cron job per batchml job, and the job names.

    Every config is loaded and every trigger validated here, so a bad cron expression or time zone
    stops the daemon before anything runs. ``fire_now`` makes each job fire once at start;
    ``child_options`` go on each run's command line (:func:`child_command`).
    """
    names = resolve_jobs(project, jobs)
    triggers = {name: job_trigger(project.job(name)) for name in names}
    children = children or Children()
    # One thread per job: each thread only waits for its child, and no job waits for another's.
    scheduler = BackgroundScheduler(timezone=timezone.utc, executors={"default": ThreadPoolExecutor(max_workers=len(names))})
    for name, trigger in triggers.items():
        when = {"next_run_time": datetime.now(timezone.utc)} if fire_now else {}
        scheduler.add_job(run_scheduled, trigger, args=(children, project, name, tuple(child_options)), id=name, name=name, max_instances=1,
                          coalesce=True, misfire_grace_time=MISFIRE_GRACE_TIME, **when)
    return scheduler, names


def next_run_text(scheduler: BackgroundScheduler, job: str) -> str:
    """When the job fires next, in its own time zone, e.g. ``2026-11-29 02:00 CET``."""
    when = scheduler.get_job(job).next_run_time
    return when.strftime("%Y-%m-%d %H:%M %Z") if when else "never"


def shutdown_grace() -> float:
    """Seconds a running child may take after a stop signal: env ``BATCHML_SHUTDOWN_GRACE`` or the default."""
    value = os.environ.get(GRACE_ENV)
    if value is None:
        return SHUTDOWN_GRACE
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not 0 <= grace < float("inf"):
        raise ConfigError(f"environment variable {GRACE_ENV}={value!r} must be a number of seconds >= 0")
    return grace


def _share_log_handlers() -> None:
    """Route APScheduler's warnings (missed or skipped fires) through batchml's log handlers."""
    aps = logging.getLogger("apscheduler")
    aps.setLevel(logging.WARNING)
    handlers = logging.getLogger("batchml").handlers
    if handlers:
        aps.handlers = list(handlers)
        aps.propagate = False


def _announce(project: Project, scheduler: BackgroundScheduler, names: list[str]) -> None:
    log.info("scheduler started (pid %d): %d job(s); stop with SIGTERM or Ctrl-C", os.getpid(), len(names))
    for name in names:
        config = project.job(name).schedule
        log.info("%s: cron %r in %s; next run %s", name, config.cron, config.timezone, next_run_text(scheduler, name))


@contextmanager
def stop_signals(stop: threading.Event, received: list[str]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set ``stop`` (instead of killing the process)."""

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(project: Project, jobs: list[str], *, fire_now: bool | None = None, child_options: Sequence[str] = ()) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT, then stop cleanly and return.

    ``jobs`` empty means every job of the project. ``fire_now`` (default: env
    ``BATCHML_SCHEDULE_FIRE_NOW=1``) runs everything once now, then follows the schedule.
    ``child_options`` (e.g. ``["--log-format", "json"]``) are passed to every run.
    Must be called from the main thread (it installs signal handlers).
    """
    if fire_now is None:
        fire_now = os.environ.get(FIRE_NOW_ENV, "") in ("1", "true", "yes")
    grace = shutdown_grace()
    children = Children()
    scheduler, names = build_scheduler(project, jobs, children=children, fire_now=fire_now, child_options=child_options)
    _share_log_handlers()

    def after_run(event: JobExecutionEvent) -> None:
        if scheduler.running:
            log.info("%s: next run %s", event.job_id, next_run_text(scheduler, event.job_id))

    scheduler.add_listener(after_run, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    stop, received = threading.Event(), []
    with stop_signals(stop, received):
        scheduler.start()
        try:
            _announce(project, scheduler, names)
            while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
                pass
            log.info("received %s: no new runs", received[0])
        finally:
            scheduler.shutdown(wait=False)  # a run in flight keeps going; children.stop bounds it
            children.stop(grace)
    log.info("scheduler stopped")
