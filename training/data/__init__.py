"""Training data: the recipes, token shards, augmentation and batches."""
