"""Mail a run report over SMTP, with the standard library only.

:func:`send_report` never raises: a run must not fail because the mail server is down. It returns a
:class:`Delivery` that the pipeline records in ``batchml.notifications`` and prints as one warning.

The message is ``multipart/related``: first a ``multipart/alternative`` (plain-text summary, then the
HTML page), then every chart as an inline PNG whose ``Content-ID: <name>`` answers the page's
``cid:name`` references.

The SMTP password is used for ``login`` and nowhere else: errors and logs are built from the
exception type and the server's reply, and scrubbed of the password in case a server echoes it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage, MIMEPart
from email.utils import formatdate, make_msgid
from typing import Literal

from batchml.config import Settings
from batchml.reports.run_report import Report

__all__ = ["Delivery", "build_message", "send_report", "DEFAULT_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_ERROR = 300


@dataclass(frozen=True)
class Delivery:
    """The outcome of one report mail: ``sent``, ``failed`` (after retries) or ``skipped`` (not configured)."""

    status: Literal["sent", "failed", "skipped"]
    recipients: list[str] = field(default_factory=list)
    attempts: int = 0
    error: str | None = None


def build_message(report: Report, recipients: list[str], sender: str) -> EmailMessage:
    """The MIME message for ``report``: related(alternative(text, html), inline PNGs)."""
    alternative = MIMEPart()
    alternative.set_content(report.text)
    alternative.add_alternative(report.html_email, subtype="html")

    message = EmailMessage()
    message["Subject"] = report.subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(usegmt=True)
    # An explicit domain avoids make_msgid's reverse-DNS lookup of this host, which can hang.
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "batchml.local")
    message.make_related()
    message.attach(alternative)
    for name, png in report.images.items():
        message.attach(_inline_png(name, png))
    return message


def _inline_png(name: str, png: bytes) -> MIMEPart:
    part = MIMEPart()
    part.set_content(png, maintype="image", subtype="png", disposition="inline", filename=f"{name}.png", cid=f"<{name}>")
    return part


def send_report(
    report: Report,
    recipients: list[str],
    settings: Settings,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = DEFAULT_TIMEOUT,
) -> Delivery:
    """Mail ``report`` to ``recipients`` through the SMTP server in ``settings``; never raises.

    ``retries`` is the total number of attempts; between them the wait doubles from ``backoff``
    seconds. Only transient failures (connection refused or dropped, timeouts, 4xx replies) are
    retried: a wrong password, a refused address or a TLS mismatch would fail the same way again,
    and repeating a bad login can lock the account.

    >>> send_report(report, ["secops@example.com"], load_settings()).status
    'sent'
    """
    if not settings.smtp_host:
        return Delivery("skipped", list(recipients), 0, "no SMTP server configured; set BATCHML_SMTP_HOST to mail reports")
    if not recipients:
        return Delivery("skipped", [], 0, "no recipients; list them under notify.email in the job config")
    recipients = list(recipients)
    try:
        message = build_message(report, recipients, settings.smtp_from)
    except (ValueError, TypeError) as exc:  # e.g. a line break in an address: retrying cannot help
        return Delivery("failed", recipients, 0, f"cannot build the report mail: {' '.join(str(exc).split())}")
    attempts = max(1, retries)
    for attempt in range(1, attempts + 1):
        try:
            refused = _deliver(message, recipients, settings, timeout)
        except Exception as exc:  # noqa: BLE001 - delivery must never break a run; the error is returned
            error = describe_error(exc, settings)
            log.warning("report %s: mail attempt %d/%d failed: %s", report.run_id, attempt, attempts, error)
            if attempt == attempts or not _transient(exc):
                return Delivery("failed", recipients, attempt, f"{error} (after {attempt} attempt{'s' * (attempt > 1)})")
            time.sleep(backoff * 2 ** (attempt - 1))
        else:
            return _sent(report, recipients, refused, attempt)
    raise AssertionError("unreachable")  # the loop always returns


def _sent(report: Report, recipients: list[str], refused: dict, attempt: int) -> Delivery:
    """A delivery the server accepted, possibly for only some of the recipients."""
    accepted = [r for r in recipients if r not in refused]
    error = f"server refused {', '.join(sorted(refused))}" if refused else None
    return Delivery("sent", accepted, attempt, error)


def _deliver(message: EmailMessage, recipients: list[str], settings: Settings, timeout: float) -> dict:
    """One SMTP session: connect, optional STARTTLS and login, send. Returns refused recipients."""
    context = ssl.create_default_context()
    if settings.smtp_ssl:
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    try:
        if settings.smtp_starttls and not settings.smtp_ssl:
            smtp.starttls(context=context)
        if settings.smtp_user:
            password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
            smtp.login(settings.smtp_user, password)
        return smtp.send_message(message, from_addr=settings.smtp_from, to_addrs=recipients)
    finally:
        _close(smtp)


def _close(smtp: smtplib.SMTP) -> None:
    """Say QUIT. Not ``with smtp:``: its QUIT raises on an odd reply, which after an accepted
    message would count as a failure and make a retry mail the report twice."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _transient(exc: BaseException) -> bool:
    """Whether trying again later could succeed."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, (smtplib.SMTPRecipientsRefused, smtplib.SMTPNotSupportedError, ssl.SSLError)):
        return False
    return isinstance(exc, (smtplib.SMTPServerDisconnected, OSError))


def describe_error(exc: BaseException, settings: Settings) -> str:
    """One line naming the server, what went wrong and what to check; never contains the password."""
    where = f"SMTP {settings.smtp_host}:{settings.smtp_port}"
    text = _scrub(f"{where}: {_explain(exc, settings)}", settings)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


_TOKEN = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")
MIN_USER = 3
"""A shorter SMTP user name is not scrubbed: removing ``u`` everywhere garbles the message ("s***pported")
and hides nothing."""


def _scrub(text: str, settings: Settings) -> str:
    """``text`` without the SMTP password and user name, plain or base64-encoded as AUTH sends them
    (a server may echo ``AUTH PLAIN`` credentials back in its refusal). The password goes wherever
    it appears; the user name only as a whole word, and only when it is long enough to mean something."""
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
    user = settings.smtp_user if settings.smtp_user and len(settings.smtp_user) >= MIN_USER else ""
    if password:
        text = text.replace(password, "***")
    if user:
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(user)}(?![A-Za-z0-9])", "***", text)
    secrets = [secret.encode() for secret in (password, user) if secret]

    def encoded(match: re.Match) -> str:
        try:
            decoded = base64.b64decode(match[0] + "=" * (-len(match[0]) % 4), validate=True)
        except (binascii.Error, ValueError):
            return match[0]
        return "***" if any(secret in decoded for secret in secrets) else match[0]

    return _TOKEN.sub(encoded, text) if secrets else text


def _reply(exc: smtplib.SMTPResponseException) -> str:
    message = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
    return f"{exc.smtp_code} {message}"


def _explain(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"login refused ({_reply(exc)}); check BATCHML_SMTP_USER and BATCHML_SMTP_PASSWORD"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return f"every recipient was refused ({', '.join(sorted(exc.recipients))}); check notify.email"
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"sender {settings.smtp_from!r} refused ({_reply(exc)}); check BATCHML_SMTP_FROM"
    if isinstance(exc, smtplib.SMTPNotSupportedError) and "AUTH" in str(exc):  # a user is set, the server offers no login
        return (f"{exc}; unset BATCHML_SMTP_USER if the server takes mail without a login, or set BATCHML_SMTP_STARTTLS "
                f"if it offers login only over TLS")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return f"{exc}; check BATCHML_SMTP_STARTTLS / BATCHML_SMTP_SSL against what the server offers"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"server replied {_reply(exc)}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc}); check BATCHML_SMTP_SSL / BATCHML_SMTP_STARTTLS and the port"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; is the server up, and are BATCHML_SMTP_HOST / BATCHML_SMTP_PORT right?"
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):  # smtplib rewraps read timeouts
        return "no answer before the timeout; check the host, port and firewall"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"server closed the connection ({exc})"
    if isinstance(exc, OSError):
        return f"cannot connect ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"
