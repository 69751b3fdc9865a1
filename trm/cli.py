"""Entry-point plumbing: logging set-up and one clear sentence, not a traceback, for a user's mistake."""

from __future__ import annotations

import logging
import sys
from typing import Callable

import datasets
import transformers

from data.files import DataError
from trm.recipe import RecipeError
from trm.rules import RuleViolation

USER_ERRORS = (RuleViolation, RecipeError, DataError, FileNotFoundError, FileExistsError)
# This project's loggers speak at INFO; every other library (HTTP clients log each request at INFO) at WARNING.
PROJECT_LOGGERS = ("__main__", "data", "models", "trm", "run_clm", "run_sft", "run_eval", "run_index", "run_ask", "run_chat", "run_serve")


def run_main(main: Callable[[], None]) -> None:
    """Run `main`; a rule violation or bad input ends the program with one line and exit status 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    try:
        main()
    except RuleViolation as error:
        print(f"refused: {error}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
