"""What marks a checkpoint of training.train, shared by the trainer that writes it and
export.checkpoint, which reads it (the data flow runs training -> export, so export imports this).

A checkpoint is a dict loadable with torch.load(weights_only=True): {"format": CHECKPOINT_FORMAT,
"stage": "jepa" | "generator", "model_config", "train_config", "model": state dict, "optimizer",
"step", "examples_seen", "elapsed_s", "best_dev", "world_size", "rng", "tokenizer"}.
"""

CHECKPOINT_FORMAT = "cmi-train-1"
