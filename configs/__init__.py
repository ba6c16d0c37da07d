"""Config files: one per model family (`get_config(variant)`), sharing configs/common.py."""
