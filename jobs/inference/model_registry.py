"""A run's export in MLflow as a model: logged with jobs/inference/mlflow_model.py as its code, registered
under `tracking.registered_model` when that is set, with the test scores and their sacreBLEU
signatures as tags of the version; and the way back from a `models:/` URI to the export's files.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import yaml

from jobs.inference.scores import Scores

EXPORT = "export"  # the model's one artifact: the key, and its directory inside the model's artifacts
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MODEL_NAME = "model"
# What the model's code imports besides aiayn itself, which must be installed where it is served
# (`mlflow models serve --env-manager local` in aiayn's environment).
REQUIREMENTS = ("torch", "sentencepiece", "safetensors", "pyarrow", "sacrebleu", "numpy", "pyyaml", "tqdm",
                "ctranslate2")


def _pinned(names: tuple[str, ...]) -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in names]


def log_translation_model(tracking_uri: str, run_id: str, export_dir: Path, test: Scores | None,
                          registered_name: str) -> str:
    """Log the export as the run's model (and register it); returns its `models:/` URI. Once per
    run: a rerun of a finished run (after an outage at its end) finds what was logged before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    model_uri = _logged_before(client, run_id)
    if not model_uri:
        with mlflow.start_run(run_id=run_id):
            model_uri = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(MODEL_CODE),
                                                artifacts={EXPORT: str(export_dir)},
                                                pip_requirements=_pinned(REQUIREMENTS)).model_uri
    if not registered_name:
        return model_uri
    versions = client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
    version = str(versions[0].version if versions else mlflow.register_model(model_uri, registered_name).version)
    tags = {"run_id": run_id}
    if test is not None:
        tags.update({key: f"{value:.2f}" for key, value in test.metrics("test").items()})
        tags.update(bleu_signature=test.bleu_signature, chrf_signature=test.chrf_signature)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return f"models:/{registered_name}/{version}"


def _logged_before(client, run_id: str) -> str:
    """The URI of this run's model if an earlier end of the run logged it completely, else ""."""
    from mlflow.entities import LoggedModelStatus

    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in models if m.name == MODEL_NAME and m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else ""


def export_inside(model_dir: Path) -> Path:
    """The export's directory inside a downloaded MLflow model of aiayn's."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    return model_dir / flavor["artifacts"][EXPORT]["path"]
