"""Reports over runs: the Jinja2 templates both HTML pages share, and the job's history page."""
