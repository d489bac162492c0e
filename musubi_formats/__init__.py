"""musubi-tuner's file formats, shared by the trainer, the evaluation and the run reader: the dataset
TOML, the sample prompt file, and how samples and checkpoints are named."""
