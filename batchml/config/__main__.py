"""``python -m batchml.config``: print the config reference table of README.md."""

from batchml.config.schema import reference_markdown

print(reference_markdown())
