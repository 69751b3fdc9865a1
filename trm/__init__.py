"""Shared machinery of the TRM entry points: recipes, the user's rules, training, generation, evaluation."""
