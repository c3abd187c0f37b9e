"""The Dask engine: the same job's pulls, checks, drift tallies and scoring on a Dask cluster.

``connect`` opens the client (a scheduler's address, or a LocalCluster here); ``tasks`` holds
what runs on the workers (picklable arguments in, :class:`~batchml.storage.lake.PartFile` and
counts out; no warehouse access); ``run`` is the nightly run whose steps hand their rows to the
cluster while the client keeps every decision and the one commit.
"""
