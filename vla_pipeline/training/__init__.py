"""Training stage: the stable train/val split, the window dataset over the store, the compute
plan, the training loop, MLflow run tracking and the decision when to retrain. Imports the data
and policy stages only."""
