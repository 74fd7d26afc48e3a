"""Ways to start a merge without a person: Prefect events, a webhook receiver, a folder watcher.

Everything here talks to a Prefect server; the core package ``mergeflow`` never imports it.

* :mod:`triggers.launch`: start the merge deployment for one adapter, idempotently.
* :mod:`triggers.events`: emit ``mergeflow.adapter.ready`` (the deployments' event trigger).
* :mod:`triggers.webhook`: the FastAPI receiver behind ``mergeflow webhook serve``.
* :mod:`triggers.batching`: which of its deliveries share one batch run (its window).
* :mod:`triggers.finished`: find finished adapters in a folder or an S3 prefix.
"""
