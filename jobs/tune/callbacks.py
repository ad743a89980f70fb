"""A sweep's callbacks: Ray Tune's on the sweep's driver (one line per trial event), and Ray
Train's in each trial (what the workers report, handed to Tune).

A trial the scheduler stops early is ended in MLflow here too (its driver is stopped with it, so
nothing else would end its run): KILLED, with the step and the reason as a tag.
"""

from __future__ import annotations

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

STOPPED_TAG = "aiayn.stopped_early"  # on a trial's MLflow run: why and when the scheduler stopped it


class TrialLines(Callback):
    def __init__(self, sweep: str, metric: str, scheduler: str, tracking_uri: str, experiment: str,
                 mlflow_environment: dict[str, str]) -> None:
        self.sweep, self.metric, self.scheduler = sweep, metric, scheduler
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.mlflow_environment = mlflow_environment  # the client's budget for the call that ends a run

    @staticmethod
    def _say(line: str) -> None:
        print(f"[aiayn] {line}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        values = ", ".join(f"{key}={value}" for key, value in sorted(trial.config.items()))
        self._say(f"trial {trial.trial_id} started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.metric in result and "run_id" not in result:
            self._say(f"trial {trial.trial_id} step {result.get('step')}: {self.metric} {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        if last.get("run_id"):
            value = f", {self.metric} {last[self.metric]:.4f}" if self.metric in last else ""
            self._say(f"trial {trial.trial_id} finished at step {last.get('step')}{value}")
            return
        step = last.get("step", 0)
        self._say(f"trial {trial.trial_id} stopped early by {self.scheduler} at step {step}: its {self.metric} was "
                  "not among the best at that step; its checkpoints are kept")
        self._end_in_mlflow(trial, step)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} failed: {trial.error_file or 'see its log'}")

    def _end_in_mlflow(self, trial, step: int) -> None:
        from mlflow.tracking import MlflowClient

        from jobs.report.tracking import find_run, request_budget

        name = f"{self.sweep}-{trial.trial_id}"  # the trial's run name (sweep.trial_job)
        try:
            with request_budget(self.mlflow_environment):
                client = MlflowClient(self.tracking_uri)
                experiment = client.get_experiment_by_name(self.experiment)
                run = find_run(self.tracking_uri, experiment.experiment_id, name) if experiment else None
                if run is not None:
                    client.set_tag(run.info.run_id, STOPPED_TAG, f"{self.scheduler} at step {step}")
                    client.set_terminated(run.info.run_id, "KILLED")
        except Exception as error:  # noqa: BLE001 - a line, never a failed sweep
            self._say(f"trial {trial.trial_id}: its MLflow run could not be ended ({type(error).__name__}); "
                      f"`aiayn end --name {name}` ends it")


class ReportsBeforeTheEnd(TuneReportCallback):
    """The workers' reports that carry the sweep's metric (each validated checkpoint's) to Tune,
    but the last step's: that one reaches Tune from the trial once its run has ended, export and
    test scores done, so that no scheduler decision at the last step stops a run in its end. A
    report without the metric (a resumed run registering the checkpoint it resumed from) is not
    Tune's: it refuses results that lack it."""

    def __init__(self, metric: str, last_step: float) -> None:
        super().__init__()
        self.metric, self.last_step = metric, last_step

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and self.metric in metrics[0] and metrics[0].get("step", 0) < self.last_step:
            super().after_report(run_context, metrics, checkpoint)
