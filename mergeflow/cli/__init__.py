"""The `mergeflow` command: its commands, progress display, signal handling and flag words."""
