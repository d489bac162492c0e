"""The watcher side of training, run inside ComfyUI and torch-free: launch and stop jobs, read a run's
folder (status, metrics, checkpoints, samples), plot it, and score its checkpoints. It meets the
training process only through `training_contract`."""
