"""Staging, durable writes, hashing and small on-disk memos."""
