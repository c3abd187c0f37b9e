"""Reports over runs: the Jinja2 templates both HTML pages share, and the job's history page."""

HISTORY_FILE = "history.html"  # the job's history page, beside its run reports in reports/<job>/
