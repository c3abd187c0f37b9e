"""Reports: the run report's content (``run_report``), its HTML blocks (``html``) and charts
(``charts``), mail over SMTP (``mail``), and reading a run back to write and deliver it (``deliver``)."""
