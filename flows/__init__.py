"""Prefect flows: orchestration only; the work is in ``tasks/`` and ``epochwise/``."""

# `persist_result` of every flow whose caller reads its return value (the CLI, a sweep's trial chain).
# A caller gets the value from the run's final state. When the client's proposal of that state times out
# after the server committed it, Prefect's retry is rejected as a duplicate transition and the client
# gets back the state the API holds, which carries only a reference to a persisted result: without one,
# `state.result()` raises MissingResult although the run completed (tests/flows/test_flow_results.py).
RESULT_READ_BACK = True
