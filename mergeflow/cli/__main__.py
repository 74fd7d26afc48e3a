"""``python -m mergeflow.cli``: the ``mergeflow`` command."""

from mergeflow.cli.app import app

if __name__ == "__main__":
    app()
