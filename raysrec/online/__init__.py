"""The live state of the service: per-user events from ``POST /events``, read by ``/recommend {"user_id"}``.

* :mod:`~raysrec.online.events`: the config (``store:`` section), an event, and the checks of a batch;
* :mod:`~raysrec.online.store`: the store interface and :func:`~raysrec.online.store.open_store`;
* :mod:`~raysrec.online.sqlite_store` (one host, the default) and :mod:`~raysrec.online.redis_store` (clusters);
* :mod:`~raysrec.online.log`: the resumable export of acknowledged events to the Parquet event log;
* :mod:`~raysrec.online.replay`: ``raysrec events ingest``, a log replayed through ``POST /events``.

All of it is plain Python, testable without Ray; the Serve app (:mod:`raysrec.serving.app`) calls it.
"""
