"""Data preparation, pretraining, generator training, evaluation and benchmarks for CMI models."""
