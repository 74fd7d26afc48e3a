"""The finished folder's small files, card and manifest."""
