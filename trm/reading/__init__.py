"""Answers from passages: grounded decoding (a span of the passage or the no-answer reply) and the full-text
index that retrieves passages for `make ask`. Nothing here trains; the index is never training data."""
