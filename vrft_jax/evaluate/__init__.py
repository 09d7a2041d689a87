"""Evaluation: evaluators by type (`evaluators`), their metrics (`detection`, `classification`, `grounding`),
the readers of completions (`readers`), the `score` command (`score`), the report (`report`); the CLI is
`python -m vrft_jax.evaluate` (`__main__`)."""
