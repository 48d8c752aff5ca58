"""MLflow models-from-code entry point: a registered policy is this file plus its policy directory
(no pickled objects). `registry.log_policy_model` logs it."""

import mlflow

from vla_pipeline.evaluation.registry import PolicyModel

mlflow.models.set_model(PolicyModel())
