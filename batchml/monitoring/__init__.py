"""Monitoring, pure statistics without IO: drift judged per feature and for the dataset (``drift``),
the reference profile stored with each model and the streamed current side (``profiles``), the
two-sample statistics themselves (``statistics``), and realised / estimated performance
(``performance``)."""
