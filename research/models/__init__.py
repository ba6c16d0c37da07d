"""Model families: decoder-only (decoder.py); encoder and encoder-decoder slot in beside it."""
