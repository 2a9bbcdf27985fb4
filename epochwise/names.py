"""Names shared by the deployment definitions and the flows that start deployments (no imports of flows
here, so tasks and flows can use them without an upward import)."""

TAG = "epochwise"  # every epochwise deployment and flow run; the crash automation matches on it
ANY_FOLD = "any-fold"  # the generic epoch-train deployment: --param fold=...
NIGHTLY = "nightly"  # the nightly-folds deployment
SCHEDULE_SLUG = "nightly"  # slug of the nightly cron schedule, so re-applying updates it in place
