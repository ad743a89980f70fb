"""The export as an MLflow model: a `python_function` whose `predict` takes source sentences (a
list of strings, or a one-column DataFrame) and returns their translations, so it loads with
`mlflow.pyfunc.load_model("models:/NAME/VERSION")` and serves with `mlflow models serve` like
every other model in the Model Registry. Its signature comes from `predict`'s type hints.

It is a model from code (MLflow's recommended form): this file is the model's code, the export
(weights in safetensors, config, tokenizer) its one artifact, so loading it unpickles nothing. The
export keeps its own decoding settings (beam size and length penalty of the run that made it).
It translates on the first GPU where the server has one, as `aiayn translate --device auto` does.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

from jobs.inference.model_registry import EXPORT


class Translator(mlflow.pyfunc.PythonModel):
    """Source sentences in, translations out, by the export's beam search."""

    def load_context(self, context) -> None:
        # aiayn's modules when MLflow loads the model, not when it reads this file to log it
        from data_pipeline.tokenizer import load_tokenizer
        from jobs.inference.evaluation import inference_device, open_translator

        directory = Path(context.artifacts[EXPORT])
        # As the run decoded, on the GPU where the server has one.
        self.translate, _ = open_translator(directory, "auto", device=inference_device("auto"))
        self.tokenizer = load_tokenizer(str(directory / "tokenizer.model"))

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        hypotheses = self.translate(self.tokenizer.encode(model_input, add_eos=True))
        return self.tokenizer.decode(hypotheses)


mlflow.models.set_model(Translator())
