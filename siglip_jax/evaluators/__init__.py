"""Evaluators run during training and from the evaluation CLI."""
