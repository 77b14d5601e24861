"""Benchmarks of the tokenizer, training, the model, the daemon and DIL."""
