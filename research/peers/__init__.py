"""Reference implementations in other frameworks, for same-machine benchmark ratios only."""
