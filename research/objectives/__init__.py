"""Pretraining objectives: each file holds the data-side transform and the loss side by side."""
