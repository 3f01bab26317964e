"""Everything above one trial: configuration, Ray Tune, MLflow, the selection table, the CLI."""
