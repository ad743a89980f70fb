"""An MLflow user for each job submitted to the local cluster.

The cluster's MLflow admits its administrator and no one else by default (NO_PERMISSIONS). The
administrator's login stays with aiayn's own commands on this machine; no node carries it. Each
job logs in as a user made for it alone, who may write to the experiment and the registered model
its command names and to nothing else: a job cannot delete or replace a registered model it was not
given (a registered model is code: it runs where it is served), cannot read other experiments and
cannot make users or change permissions. Both are made by the administrator before the job is
submitted, so the job never holds MANAGE on them: it can add a model version, not delete the model.
"""

from __future__ import annotations

import os
import secrets

from cluster.credentials import MlflowLogin

JOB_USER_PREFIX = "job-"
JOB_PERMISSION = "EDIT"  # read and write; MANAGE (delete, grant) stays with the administrator


def job_login(tracking_uri: str, admin: MlflowLogin, job_id: str, experiment: str,
              registered_model: str = "") -> dict[str, str]:
    """Make the MLflow user of job `job_id` (a new one each time: a job's password is never reused)
    with EDIT on `experiment` and `registered_model`, both made here if missing; returns what the
    job's MLflow clients read to log in as it."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    os.environ.update(admin.client_environment())  # this short-lived command acts as the administrator
    tracking = MlflowClient(tracking_uri)
    found = tracking.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else tracking.create_experiment(experiment)
    if registered_model:
        try:
            tracking.create_registered_model(registered_model)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    username, password = f"{JOB_USER_PREFIX}{job_id}-{secrets.token_hex(3)}", secrets.token_urlsafe(24)
    auth = AuthServiceClient(tracking_uri)
    auth.create_user(username, password)
    auth.grant_user_permission(username, "experiment", experiment_id, JOB_PERMISSION)
    if registered_model:
        auth.grant_user_permission(username, "registered_model", registered_model, JOB_PERMISSION)
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}
