"""The data side: where source rows come from (``sources``: tables, Parquet files and object
stores), point-in-time pulls from the source (``extract``), the data contract and its quarantine
rules (``validate``), model matrices encoded as ``model.json`` says (``features``)."""
