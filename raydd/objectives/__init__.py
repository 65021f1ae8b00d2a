"""Guidance and scoring objectives, and fine-tuning loss terms: one file per idea."""
