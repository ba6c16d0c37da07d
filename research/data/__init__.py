"""Data: sources -> tokenizer -> objective transform -> packing -> global batches on the mesh."""
