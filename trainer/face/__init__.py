"""The face-identity hook of the training step (`--enable_face_loss`, `--use_face_as_loss`): `hook.py` the
`TrainingHook` the CLI installs, `loss.py` the differentiable loss, `targets.py` the cached face targets,
`metrics.py` the metric names and the sample scoring."""
