"""Prefect flows: the orchestration of Mergeflow's core, and nothing else."""
