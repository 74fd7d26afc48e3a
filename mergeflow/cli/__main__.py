"""``python -m mergeflow.cli`` and the ``mergeflow`` console script: the typer app, then a quick
exit (:mod:`mergeflow.cli.leave`)."""

from typing import NoReturn

from mergeflow.cli.app import app
from mergeflow.cli.leave import run_then_leave


def main() -> NoReturn:
    """The ``mergeflow`` command."""
    run_then_leave(app)


if __name__ == "__main__":
    main()
