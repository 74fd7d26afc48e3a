"""``python -m mergeflow.cli`` and the ``mergeflow`` console script: the typer app, then a quick
exit (:mod:`mergeflow.cli.leave`)."""

from typing import NoReturn

from mergeflow.cli.app import app
from mergeflow.cli.leave import run_then_leave
from mergeflow.pipeline.resources import limit_malloc_arenas


def main() -> NoReturn:
    """The ``mergeflow`` command (its process keeps few malloc arenas, before any thread)."""
    limit_malloc_arenas()
    run_then_leave(app)


if __name__ == "__main__":
    main()
