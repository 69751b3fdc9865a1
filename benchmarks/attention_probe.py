#!/usr/bin/env python
"""Where a model's copying comes from: its position table, and which heads attend to the previous token or back
along a repetition.

    python benchmarks/attention_probe.py MODEL_DIR [MODEL_DIR ...] [--half 64] [--rows 8]

For each model: the mean row norm of the learned position table against the token table's, and how alike
positions 1, 10 and 100 apart are (mean correlation of their rows): a table whose neighbours are no more alike
than distant positions gives a previous-token head little to work with. Then, on random token sequences each
followed by itself again (the copy probe's input, `trm.evaluation.copying_loss`), every head's mean attention in
the second copy on the token just before (previous-token heads) and on the token after the same token's first
occurrence (induction heads, which copy). Uniform attention over that stretch would be about 1/100.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trm.generation import load_model  # noqa: E402


def position_table_summary(model) -> dict:
    positions = model.transformer.wpe.weight.detach().double()
    tokens = model.transformer.wte.weight.detach().double()
    correlation = torch.corrcoef(positions)
    return {"position_row_norm": float(positions.norm(dim=1).mean()), "token_row_norm": float(tokens.norm(dim=1).mean()),
            **{f"correlation_at_{d}": float(torch.diagonal(correlation, d).mean()) for d in (1, 10, 100) if d < len(positions)}}


@torch.no_grad()
def head_attention(model, half: int, rows: int, seed: int = 0) -> list[dict]:
    """Per layer, each head's mean attention on the previous token and on the induction target, in the second copy."""
    half = min(half, int(model.config.n_positions) // 2)
    tokens = torch.randint(256, 10_000, (rows, half), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([tokens, tokens], dim=1)
    model.config._attn_implementation = "eager"  # the attention weights themselves, not a fused kernel's output
    attentions = model(ids, output_attentions=True).attentions
    queries = torch.arange(half + 1, 2 * half)
    return [{"previous_token": layer[:, :, queries, queries - 1].mean((0, 2)).tolist(),
             "induction": layer[:, :, queries, queries - half + 1].mean((0, 2)).tolist()} for layer in attentions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--half", type=int, default=64, help="tokens in each copy")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    for path in args.models:
        model, _ = load_model(path)
        table = position_table_summary(model)
        print(f"{path}\n  position rows: norm {table['position_row_norm']:.2f} (token rows {table['token_row_norm']:.2f}); "
              "correlation of positions " + ", ".join(f"{key.rsplit('_', 1)[1]} apart {value:.2f}"
                                                      for key, value in table.items() if key.startswith("correlation")))
        for index, layer in enumerate(head_attention(model, args.half, args.rows)):
            print(f"  layer {index}: previous token " + " ".join(f"{v:.2f}" for v in layer["previous_token"])
                  + " | induction " + " ".join(f"{v:.2f}" for v in layer["induction"]))


if __name__ == "__main__":
    main()
