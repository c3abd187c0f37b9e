"""A real nightly run mails its report through a real SMTP server (aiosmtpd on localhost)."""

from __future__ import annotations

import email
from email.policy import default as default_policy
from pathlib import Path

from test_notify import closed_port, smtp_server  # noqa: F401 - the real SMTP server fixture

from batchml import api
from conftest import day, job_config


def smtp_env(port: int) -> dict:
    return {"BATCHML_SMTP_HOST": "127.0.0.1", "BATCHML_SMTP_PORT": str(port), "BATCHML_SMTP_FROM": "batchml@example.com"}


def test_a_drift_night_writes_a_report_and_mails_it(demo_project, smtp_server):  # noqa: F811
    controller, handler = smtp_server
    drift = {"numeric_method": "psi", "categorical_method": "psi", "dataset_drift_share": 0.25}  # 3 of 11 features shift
    demo_project.write_config(job_config(notify={"email": ["secops@example.com"], "on": ["drift", "promotion", "failure"]}, drift=drift))
    env = smtp_env(controller.port)
    demo_project.cli("run", "vuln_risk", "--as-of", f"{day(60):%Y-%m-%d}", check=True, env=env)  # first champion: a promotion
    api.run("vuln_risk", project=demo_project.root, as_of=day(95), notify=False)  # a quiet night in between, in-process
    demo_project.cli("run", "vuln_risk", "--as-of", f"{day(105):%Y-%m-%d}", check=True, env=env)  # only shifted rows: drift

    assert len(handler.envelopes) == 2
    message = email.message_from_bytes(handler.envelopes[-1].content, policy=default_policy)
    assert handler.envelopes[-1].rcpt_tos == ["secops@example.com"]
    assert message["Subject"].startswith(f"[batchml] vuln_risk {day(105):%Y-%m-%d}: drift in ")
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "cvss_base" in html and "drift" in text.lower()
    cids = {part["Content-ID"].strip("<>") for part in message.walk() if part.get_content_type() == "image/png"}
    assert cids and all(f"cid:{cid}" in html for cid in cids)
    reports = sorted((demo_project.root / "warehouse" / "reports" / "vuln_risk").glob("*.html"))
    history = [path for path in reports if path.name == "history.html"]  # the job's history page, refreshed after each run
    reports = [path for path in reports if path not in history]
    assert len(reports) == 3 and "data:image/png;base64," in reports[-1].read_text() and len(history) == 1
    assert demo_project.query("SELECT status FROM batchml.notifications") == [("sent",), ("sent",)]


def test_smtp_down_never_fails_the_run_and_is_recorded(demo_project):
    demo_project.write_config(job_config(notify={"email": ["secops@example.com"], "on": ["always"]}))
    with closed_port() as port:
        env = {**smtp_env(port), "BATCHML_SMTP_PASSWORD": "s3cret-pw", "BATCHML_SMTP_USER": "ops"}
        result = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-01", env=env)

    assert result.returncode == 0, result.stderr
    assert "report mail not delivered" in result.stderr
    status, error = demo_project.query("SELECT status, error FROM batchml.notifications")[0]
    assert status == "failed" and "refused" in error.lower()
    assert demo_project.scalar("SELECT status FROM batchml.runs") == "succeeded"
    everything = result.stdout + result.stderr + error + "".join(
        p.read_text() for p in Path(demo_project.root / "warehouse" / "reports").rglob("*.html"))
    assert "s3cret-pw" not in everything


def test_a_failed_run_mails_its_error(demo_project, smtp_server):  # noqa: F811
    controller, handler = smtp_server
    demo_project.write_config(job_config(notify={"email": ["oncall@example.com"], "on": ["failure"]},
                                         features={"numeric": ["cvss_base", "gone_column"], "categorical": []},
                                         validation={"ranges": {"cvss_base": [0, 10]}}))
    result = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-01", env=smtp_env(controller.port))

    assert result.returncode == 1
    message = email.message_from_bytes(handler.envelopes[-1].content, policy=default_policy)
    assert "FAILED" in message["Subject"]
    assert "gone_column" in message.get_body(("plain",)).get_content()


def test_a_mail_due_without_an_smtp_server_is_one_warning_naming_the_setting(demo_project):
    demo_project.write_config(job_config(notify={"email": ["secops@example.com"], "on": ["promotion"]}))

    result = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-01", env={"BATCHML_SMTP_HOST": ""})  # first champion: a promotion

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "BATCHML_SMTP_HOST" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "not mailed" in warnings[0], result.stderr
    assert demo_project.query("SELECT status FROM batchml.notifications") == [("skipped",)]
