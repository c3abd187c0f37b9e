"""Report mail against a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import email
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import default as default_policy

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from batchml.config import Settings
from batchml.reports.mail import Delivery, send_report
from batchml.reports.run_report import Report, ReportData, build_report

PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
USER, PASSWORD = "batchml-bot", "s3cret-Pa55-word!"
AS_OF = datetime(2026, 11, 28, tzinfo=timezone.utc)

# The AUTH test server runs without TLS on purpose (localhost only); aiosmtpd warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@contextmanager
def closed_port() -> Iterator[int]:
    """A localhost port that refuses connections: bound (so no other test, in this worker or another,
    can take it) but never listening. A port found free and released would be a race between workers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class AnyPortController(Controller):
    """aiosmtpd on the port the OS picks (port 0), read back once it listens: no port to race for."""

    def __init__(self, handler, **kwargs) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, ready_timeout=60, **kwargs)  # loaded machines are slow to start a thread

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class Collector:
    """aiosmtpd handler keeping every envelope; refuses recipients at nobody@."""

    def __init__(self) -> None:
        self.envelopes = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"

    def message(self, index: int = -1) -> EmailMessage:
        return email.message_from_bytes(self.envelopes[index].content, policy=default_policy)


def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


def _serve(**smtp_parameters):
    handler = Collector()
    controller = AnyPortController(handler, **smtp_parameters)
    controller.start()
    return controller, handler


@pytest.fixture
def smtp_server():
    controller, handler = _serve()
    yield controller, handler
    controller.stop()


@pytest.fixture
def auth_server():
    controller, handler = _serve(authenticator=authenticate, auth_required=True, auth_require_tls=False)
    yield controller, handler
    controller.stop()


def settings_for(port: int, **overrides) -> Settings:
    """Explicit SMTP settings, so BATCHML_SMTP_* in the developer's environment cannot leak in."""
    values = dict(smtp_host="127.0.0.1", smtp_port=port, smtp_user=None, smtp_password=None,
                  smtp_starttls=False, smtp_ssl=False, smtp_from="batchml@example.com")
    return Settings(**{**values, **overrides})


def _histogram(labels: list[str], tilt: float) -> dict:
    current = [1 + tilt * i for i in range(len(labels))]
    return {"labels": labels, "reference": [1 / len(labels)] * len(labels), "current": [v / sum(current) for v in current]}


@pytest.fixture(scope="module")
def report() -> Report:
    """A small drift report with three charts and a hostile category level."""
    drifted = {"feature": "ecosystem", "method": "psi", "kind": "feature", "statistic": 0.4, "p_value": None, "threshold": 0.2,
               "drifted": True, "n_reference": 1000, "n_current": 100, "error": None, "histogram": _histogram(["npm", SCRIPT], 1.0)}
    score = {**drifted, "feature": "__score__", "kind": "prediction", "histogram": _histogram(["low", "medium", "high"], 0.5)}
    performance = [{"run_id": f"r{d}", "as_of": datetime(2026, 11, d, tzinfo=timezone.utc), "metric": "roc_auc", "value": 0.8, "n": 10}
                   for d in (26, 27)]
    data = ReportData(job="vuln_risk", run_id="r-mail", kind="nightly", status="succeeded", as_of=AS_OF, started_at=AS_OF,
                      rows_extracted=10, rows_scored=10, drift=[drifted, score], dataset_drift=True, performance=performance,
                      error=f"warning: odd level {SCRIPT}")
    return build_report(data)


def test_report_is_delivered_with_both_parts_and_inline_charts(smtp_server, report: Report) -> None:
    controller, handler = smtp_server
    delivery = send_report(report, ["secops@example.com", "lead@example.com"], settings_for(controller.port))
    assert delivery == Delivery("sent", ["secops@example.com", "lead@example.com"], 1, None)

    envelope = handler.envelopes[0]
    assert envelope.mail_from == "batchml@example.com"
    assert envelope.rcpt_tos == ["secops@example.com", "lead@example.com"]
    message = handler.message()
    assert message["Subject"] == report.subject and message["From"] == "batchml@example.com"
    assert message.get_content_type() == "multipart/related"
    alternative, *images = message.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, page = alternative.iter_parts()
    assert text.get_content_type() == "text/plain" and text.get_content().replace("\r\n", "\n") == report.text
    assert page.get_content_type() == "text/html"

    html = page.get_content()
    content_ids = {image["Content-ID"].strip("<>"): image.get_content() for image in images}
    assert set(re.findall(r'src="cid:([^"]+)"', html)) == set(content_ids) == {"drift-1", "score", "performance"}
    assert all(image.get_content_type() == "image/png" and image.get_content_disposition() == "inline" for image in images)
    assert all(png.startswith(PNG) for png in content_ids.values())
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and SCRIPT not in html


def test_non_ascii_subject_survives(smtp_server) -> None:
    controller, handler = smtp_server
    failed = build_report(ReportData(job="vuln_risk", run_id="r-f", kind="nightly", status="failed", as_of=AS_OF, started_at=AS_OF,
                                     error="café could not be read"))
    assert send_report(failed, ["secops@example.com"], settings_for(controller.port)).status == "sent"
    assert handler.message()["Subject"] == failed.subject and "—" in failed.subject


def test_server_down_fails_after_every_attempt_without_raising(report: Report) -> None:
    with closed_port() as port:
        delivery = send_report(report, ["secops@example.com"], settings_for(port), retries=3, backoff=0.01)
    assert delivery.status == "failed" and delivery.attempts == 3
    assert "connection refused" in delivery.error and "\n" not in delivery.error


def test_login_with_the_right_password_delivers(auth_server, report: Report) -> None:
    controller, handler = auth_server
    settings = settings_for(controller.port, smtp_user=USER, smtp_password=PASSWORD)
    assert send_report(report, ["secops@example.com"], settings).status == "sent"
    assert len(handler.envelopes) == 1


def test_unauthenticated_mail_is_refused_by_such_a_server(auth_server, report: Report) -> None:
    controller, handler = auth_server
    delivery = send_report(report, ["secops@example.com"], settings_for(controller.port), backoff=0.01)
    assert delivery.status == "failed" and handler.envelopes == []


def test_wrong_password_fails_once_and_never_leaks_the_password(auth_server, report: Report, caplog, capsys) -> None:
    controller, handler = auth_server
    wrong = PASSWORD + "-wrong"
    settings = settings_for(controller.port, smtp_user=USER, smtp_password=wrong)
    with caplog.at_level(logging.DEBUG):
        delivery = send_report(report, ["secops@example.com"], settings, backoff=0.01)
    assert delivery.status == "failed" and delivery.attempts == 1  # a bad login is not retried
    assert "login refused" in delivery.error and "BATCHML_SMTP_PASSWORD" in delivery.error
    captured = capsys.readouterr()
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("batchml"))
    assert "mail attempt 1/3 failed" in ours
    for where in (delivery.error, ours, captured.out, captured.err, repr(delivery), report.html_file(), report.text):
        assert wrong not in where and PASSWORD not in where and USER not in where
    assert handler.envelopes == []


def test_password_is_absent_when_the_connection_fails(report: Report, caplog, capsys) -> None:
    with closed_port() as port, caplog.at_level(logging.DEBUG):
        settings = settings_for(port, smtp_user=USER, smtp_password=PASSWORD)
        delivery = send_report(report, ["secops@example.com"], settings, retries=2, backoff=0.01)
    captured = capsys.readouterr()
    assert delivery.status == "failed" and delivery.attempts == 2
    for where in (delivery.error, caplog.text, captured.out, captured.err):
        assert PASSWORD not in where


def test_starttls_that_the_server_does_not_offer_fails_without_retrying(smtp_server, report: Report) -> None:
    controller, _ = smtp_server
    delivery = send_report(report, ["secops@example.com"], settings_for(controller.port, smtp_starttls=True), backoff=0.01)
    assert delivery.status == "failed" and delivery.attempts == 1 and "STARTTLS" in delivery.error


def test_implicit_ssl_against_a_plain_server_fails_cleanly(smtp_server, report: Report) -> None:
    controller, _ = smtp_server
    delivery = send_report(report, ["secops@example.com"], settings_for(controller.port, smtp_ssl=True), backoff=0.01)
    assert delivery.status == "failed" and delivery.attempts == 1 and "TLS failed" in delivery.error


def test_partly_refused_recipients_are_reported(smtp_server, report: Report) -> None:
    controller, handler = smtp_server
    delivery = send_report(report, ["secops@example.com", "nobody@example.com"], settings_for(controller.port))
    assert delivery.status == "sent" and delivery.recipients == ["secops@example.com"]
    assert "nobody@example.com" in delivery.error and handler.envelopes[0].rcpt_tos == ["secops@example.com"]


def test_all_recipients_refused_fails_without_retrying(smtp_server, report: Report) -> None:
    controller, handler = smtp_server
    delivery = send_report(report, ["nobody@example.com"], settings_for(controller.port), backoff=0.01)
    assert delivery.status == "failed" and delivery.attempts == 1 and "notify.email" in delivery.error
    assert handler.envelopes == []


@pytest.mark.parametrize(
    ("host", "recipients", "reason"),
    [(None, ["secops@example.com"], "BATCHML_SMTP_HOST"), ("127.0.0.1", [], "notify.email")],
)
def test_skipped_when_not_configured(report: Report, host, recipients, reason) -> None:
    delivery = send_report(report, recipients, settings_for(25, smtp_host=host))
    assert delivery.status == "skipped" and delivery.attempts == 0 and reason in delivery.error


def test_a_silent_server_times_out(report: Report) -> None:
    with socket.socket() as silent:  # listens, never speaks: connect succeeds, the greeting never comes
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.perf_counter()
        delivery = send_report(report, ["secops@example.com"], settings_for(silent.getsockname()[1]), retries=1, timeout=0.3)
    assert delivery.status == "failed" and "timeout" in delivery.error
    # a guard against a hang (the 0.3 s timeout ignored), not a measure of speed
    assert time.perf_counter() - started < 60


def test_a_malformed_address_fails_without_raising(smtp_server, report: Report) -> None:
    controller, handler = smtp_server
    delivery = send_report(report, ["secops@example.com\nBcc: evil@example.com"], settings_for(controller.port))
    assert delivery.status == "failed" and handler.envelopes == []


def test_credentials_echoed_back_base64_encoded_are_scrubbed_too() -> None:
    """A server may echo AUTH PLAIN's base64 of NUL user NUL password in its refusal."""
    import base64
    import smtplib

    from batchml.reports.mail import describe_error

    settings = settings_for(25, smtp_user=USER, smtp_password=PASSWORD)
    echoed = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    refusal = smtplib.SMTPAuthenticationError(535, f"5.7.8 bad credentials for PLAIN {echoed} ({USER})".encode())

    line = describe_error(refusal, settings)

    assert echoed not in line and USER not in line and PASSWORD not in line
    assert "login refused (535 5.7.8 bad credentials for PLAIN *** (***))" in line


def test_a_user_name_against_a_server_without_auth_leaves_the_reply_readable_and_names_the_fix(smtp_server, report: Report) -> None:
    controller, handler = smtp_server  # offers no AUTH
    settings = settings_for(controller.port, smtp_user="u", smtp_password="pw-of-u")

    delivery = send_report(report, ["secops@example.com"], settings, backoff=0.01)

    assert delivery.status == "failed" and delivery.attempts == 1 and handler.envelopes == []
    assert "SMTP AUTH extension not supported" in delivery.error and "unset BATCHML_SMTP_USER" in delivery.error


def test_the_user_name_is_scrubbed_as_a_whole_word_the_password_everywhere() -> None:
    import smtplib

    from batchml.reports.mail import describe_error

    settings = settings_for(25, smtp_user="ops", smtp_password="pw")
    refusal = smtplib.SMTPAuthenticationError(535, b"5.7.8 user ops (ops@example.com) stops: operations need pwpw")

    line = describe_error(refusal, settings)

    assert "user *** (***@example.com) stops: operations need ******" in line
