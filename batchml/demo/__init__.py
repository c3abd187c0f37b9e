"""``batchml demo``: synthetic vulnerability findings (``data``) and a project with N replayed
nights on them (``build``); ``project/`` is the demo's config template."""
