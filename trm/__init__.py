"""Shared machinery of the TRM entry points: recipes, the user's rules, training, generation, evaluation;
`reading/` answers from passages and retrieves them, `sharing/` serves, uploads and exports a trained model."""
