"""Evaluation: the prompt suites that evaluations and attacks run on, and the measurements made on them."""
