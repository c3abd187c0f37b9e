"""The Jinja2 environment the run report and the history page share: one layout, autoescaping.

Every value that reaches a page goes through Jinja2's autoescaping (MarkupSafe): the only HTML is
what the templates under ``templates/`` write. Cells that need a look (a badge, a colour, a link)
are :class:`Cell` objects that the ``show`` macro renders; charts are :class:`Chart` objects, shown
as ``cid:`` images in a mail and as ``data:`` URIs in a file.

A team restyles its reports by pointing ``BATCHML_REPORT_TEMPLATES`` at a folder of its own: a
template found there wins over the built-in one of the same name (copy ``theme.html`` to change
colours, fonts and the logo; ``layout.html`` for the page frame). The built-in templates stay
reachable as ``batchml/<name>``, so a team's ``layout.html`` may ``{% extends "batchml/layout.html" %}``.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from batchml.errors import ConfigError
from batchml.reports.html import _fmt, _percent, _seconds, _version

__all__ = ["Cell", "Chart", "Charts", "render", "BUILTIN_TEMPLATES"]

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Cell:
    """A table value with a look. ``tone`` names a colour of the theme (good, bad, warn, info, neutral)."""

    value: object
    tone: str | None = None
    badge: bool = False
    bold: bool = False
    href: str | None = None  # a relative link batchml builds itself (a run report beside the page)


@dataclass(frozen=True)
class Chart:
    """A PNG chart; ``src(inline=True)`` embeds it, ``src(inline=False)`` names the mail part."""

    name: str
    png: bytes = field(repr=False)
    alt: str
    width: int = 540

    def src(self, inline: bool) -> str:
        if inline:
            return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")
        return f"cid:{self.name}"


class Charts:
    """Collects the charts a page shows, keyed by name (the mail's Content-IDs)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Chart] = {}

    def add(self, name: str, png: bytes, alt: str, width: int = 540) -> Chart:
        chart = Chart(name, png, alt, width)
        self.by_name[name] = chart
        return chart

    @property
    def images(self) -> dict[str, bytes]:
        return {name: chart.png for name, chart in self.by_name.items()}


@functools.lru_cache(maxsize=8)
def _environment(folder: str | None) -> jinja2.Environment:
    builtin = jinja2.FileSystemLoader(BUILTIN_TEMPLATES)
    loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader(folder)] if folder else []
    loaders += [builtin, jinja2.PrefixLoader({"batchml": builtin})]
    env = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=_fmt, seconds=_seconds, version=_version, percent=_percent)
    env.tests["cell"] = lambda value: isinstance(value, Cell)
    return env


def render(name: str, folder: Path | None = None, **context: object) -> str:
    """Render template ``name`` (the team's from ``folder`` if it has one, else batchml's)."""
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"report template folder {folder} does not exist; create it or fix BATCHML_REPORT_TEMPLATES")
    env = _environment(str(folder) if folder is not None else None)
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"report template {exc.filename or exc.name}: line {exc.lineno}: {exc.message}; "
                          f"fix it or unset BATCHML_REPORT_TEMPLATES") from exc
    except jinja2.TemplateError as exc:  # an unknown variable in a team's template, a missing file
        where = f"in {folder}" if folder is not None else "built in"
        raise ConfigError(f"report template {name} ({where}): {exc.message or exc}; compare it with "
                          f"{BUILTIN_TEMPLATES / name}") from exc
