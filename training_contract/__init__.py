"""What the training process and the watcher side agree on: the training options (one definition
for the command line and the launch node), the model versions, and the job folder's files
(`protocol.py`). Torch-free."""
