"""A run's export in MLflow as a model: logged with jobs/mlflow_model.py as its code, registered
under `tracking.registered_model` when that is set, with the test scores and their sacreBLEU
signatures as tags of the version; and the way back from a `models:/` URI to the export's files.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import yaml

from jobs.evaluation import Scores

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
    """Log the export as the run's model (and register it); returns its `models:/` URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(MODEL_CODE), artifacts={EXPORT: str(export_dir)},
            pip_requirements=_pinned(REQUIREMENTS), registered_model_name=registered_name or None,
        )
    if not registered_name:
        return info.model_uri
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    tags = {"run_id": run_id}
    if test is not None:
        tags.update({key: f"{value:.2f}" for key, value in test.metrics("test").items()})
        tags.update(bleu_signature=test.bleu_signature, chrf_signature=test.chrf_signature)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return f"models:/{registered_name}/{version}"


def export_inside(model_dir: Path) -> Path:
    """The export's directory inside a downloaded MLflow model of aiayn's."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    return model_dir / flavor["artifacts"][EXPORT]["path"]
