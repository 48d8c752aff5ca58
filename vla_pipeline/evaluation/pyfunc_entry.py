"""MLflow models-from-code entry point: a registered policy is this file plus its policy directory
(no pickled objects). `registry.log_policy_model` logs it."""

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from vla_pipeline.evaluation.registry import POLICY_ARTIFACT
from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.serving import StreamingPolicy


class PolicyModel(mlflow.pyfunc.PythonModel):
    """pyfunc model (logged from code by `pyfunc_entry.py`): rows of a DataFrame are consecutive frames, streamed through one policy.

    Columns: `image` (an encoded PNG/JPEG frame, any size), `instruction` (str) and optional
    `episode_id` (the stream resets whenever it changes). Returns (rows, chunk, 2) float32
    actions in robot units.
    """

    def load_context(self, context) -> None:
        self.streaming = StreamingPolicy(load_policy_dir(context.artifacts[POLICY_ARTIFACT]), colour_order="BGR")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        import cv2

        self.streaming.reset()
        episodes = model_input["episode_id"] if "episode_id" in model_input else [None] * len(model_input)
        out, current = [], object()
        for image, instruction, episode in zip(model_input["image"], model_input["instruction"], episodes):
            if episode != current:
                self.streaming.reset()
                current = episode
            frame = cv2.imdecode(np.frombuffer(bytes(image), np.uint8), cv2.IMREAD_COLOR)  # BGR
            if frame is None:
                raise ValueError("image column: a value is not an encoded PNG/JPEG image")
            out.append(self.streaming.step(frame, instruction))
        return np.stack(out) if out else np.zeros((0, self.streaming.config.chunk, 2), np.float32)


mlflow.models.set_model(PolicyModel())
