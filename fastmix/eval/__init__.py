"""Scoring a trained model: lm-evaluation-harness and the held-out losses
(`harness`), and the task suites built from the corpus (`tasks`)."""
