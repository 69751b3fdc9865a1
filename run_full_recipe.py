#!/usr/bin/env python
"""The whole recipe, end to end: phase 1 -> evaluation -> phase 2 -> evaluation -> one report.

    python run_full_recipe.py [--output_dir outputs/full_recipe] [--squad_file F] [--squad_v2_file F] \
        [--phase1_args "--train_file wiki.jsonl.xz"] [--phase2_args "--alpaca_file alpaca_data.json ..."]

Each stage is the usual command (run_clm.py, run_eval.py, run_sft.py) in its own process. Run the same
command again after an interruption: finished stages are skipped, a training stage resumes from its newest
checkpoint. On a GPU: --phase1_args "--use_cpu false" --phase2_args "--use_cpu false". The report is written
to <output_dir>/report.json and report.md.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from trm.cli import run_main
from trm.full_recipe import FullRecipe, run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/full_recipe")
    parser.add_argument("--phase1_recipe", default="recipes/phase1_pretraining.yaml")
    parser.add_argument("--phase2_recipe", default="recipes/phase2_instruction_tuning.yaml")
    parser.add_argument("--phase1_args", default="", help="extra run_clm.py arguments, as one string")
    parser.add_argument("--phase2_args", default="", help="extra run_sft.py arguments, as one string")
    parser.add_argument("--squad_file", help="SQuAD v1.1 file to score the phase-2 model on (questions it never saw)")
    parser.add_argument("--squad_v2_file", help="SQuAD v2.0 file to score the phase-2 model on")
    parser.add_argument("--blimp", default="hub", help="BLiMP for the phase-1 evaluation: a directory of *.jsonl files, hub, or none")
    parser.add_argument("--blimp_pairs_per_paradigm", type=int, help="score a seeded sample of N pairs per paradigm")
    parser.add_argument("--eval_limit", type=int, help="at most this many questions / validation blocks per evaluation")
    args = parser.parse_args(argv)
    recipe = FullRecipe(
        output_dir=Path(args.output_dir), phase1_recipe=args.phase1_recipe, phase2_recipe=args.phase2_recipe,
        phase1_args=shlex.split(args.phase1_args), phase2_args=shlex.split(args.phase2_args),
        squad_file=args.squad_file, squad_v2_file=args.squad_v2_file, eval_limit=args.eval_limit,
        blimp=None if args.blimp == "none" else args.blimp, blimp_pairs_per_paradigm=args.blimp_pairs_per_paradigm,
    )
    return run(recipe)


if __name__ == "__main__":
    run_main(main)
