"""The data side: point-in-time pulls from the source (``extract``), the data contract and its
quarantine rules (``validate``), model matrices encoded as ``model.json`` says (``features``)."""
