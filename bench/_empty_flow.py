"""The empty flow `bench/many_folds.py` deploys as its baseline (a module of its own, so the worker's
child process imports nothing but Prefect for it)."""

from prefect import flow


@flow(name="bench-empty")
def empty() -> None:
    """One flow run, no tasks: the floor of any run a worker starts."""
