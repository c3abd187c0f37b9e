"""The data side of a run: where source rows come from (``sources``)."""
