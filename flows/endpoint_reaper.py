"""``endpoint-reaper``: stop every epochwise endpoint that has been up longer than allowed.

A dedicated endpoint bills for every minute a replica runs, used or not, and Together's idle shutdown
(``inactive_timeout``) is not something to rely on. This flow runs hourly (deployment
``endpoint-reaper/hourly``) and scales to zero every deployment of every ``ew-<fold>-e<k>`` endpoint
created more than ``older_than_h`` hours ago (default ``deploy.reap_older_than_h``), and, whatever their
age, the deployments a failed deploy rollback left live (``deploy-epoch`` records each one in Prefect).
Endpoints epochwise did not create are never touched; stopped endpoints keep their names and can be
redeployed.

Steps: stop the recorded rollback leftovers -> list the project's endpoints -> keep epochwise ones older
than the limit -> scale each running deployment to min/max replicas 0.

    epochwise endpoints --reap --older-than 6h
    prefect deployment run endpoint-reaper/hourly
"""

from __future__ import annotations

from prefect import flow

from epochwise.config.deploy import DeployConfig
from epochwise.config.together import TogetherConfig
from tasks.endpoints import reap_endpoints


@flow(name="endpoint-reaper", log_prints=True, validate_parameters=True)
def endpoint_reaper(
    older_than_h: float | None = None,
    deploy: DeployConfig = DeployConfig(),
    together: TogetherConfig = TogetherConfig(),
) -> list[str]:
    """Stop epochwise endpoints older than ``older_than_h`` hours; returns the deployments stopped."""
    hours = deploy.reap_older_than_h if older_than_h is None else older_than_h
    stopped = reap_endpoints(hours * 3600.0, together)
    print(f"stopped {len(stopped)} deployment(s) of endpoints older than {hours:g} h")
    return stopped
