"""JAX/Flax research framework for language-model pretraining."""
