"""Reports: the run report's content (``run_report``), its value formatting (``html``) and charts
(``charts``), the job's history page (``history``), the Jinja2 templates both pages share
(``templating``, ``templates/``), mail over SMTP (``mail``), reading a run back to write and deliver
its report (``deliver``), and ``batchml try``'s text and Markdown (``trial``)."""

HISTORY_FILE = "history.html"  # the job's history page, beside its run reports in reports/<job>/
