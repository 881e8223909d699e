"""The training data: preprocessing raw cases into the on-disk cache, and reading it."""
