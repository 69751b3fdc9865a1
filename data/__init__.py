"""Data preparation: sources, cleaning, tokenising, packing (phase 1), prompt format and masking (phase 2)."""
