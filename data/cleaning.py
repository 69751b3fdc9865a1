"""Cleaning Wikipedia-style text into plain running prose.

Design decisions:
- Pure functions on one document at a time, so `datasets.map` can run them in parallel and tests can
  feed them literal strings.
- Only markup that is never prose is removed: `[12]`-style reference markers, `Category:` trailers,
  image file names, template fragments (`{{...}}`, stray `}}`), list bullets, markdown emphasis, and the
  headings of sections that are empty in text dumps ("References", "External links", ...).
- Runs of two or more ALL-CAPS words (how some dumps render the bold article title) are turned back
  into capitalised words; single upper-case words are left alone because they are usually acronyms.
- Newlines become spaces (the user's rule) and whitespace is collapsed last, so the output is one line.
"""

from __future__ import annotations

import re

REFERENCE_MARKER = re.compile(r"\[(?:\d+|[a-z]|note \d+|citation needed|clarification needed)\]", re.IGNORECASE)
CATEGORY_LINE = re.compile(r"^.*\bCategory:.*$", re.MULTILINE)
CATEGORY_TAIL = re.compile(r"\bCategory:.*$", re.DOTALL)
# The look-behind anchors each attempt at the start of a token, which keeps this linear in the text length.
IMAGE_NAME = re.compile(r"(?<![^\s|\[\]])[^\s|\[\]]+\.(?:jpe?g|png|svg|gif|tiff?|webp)\b", re.IGNORECASE)
TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
STRAY_MARKUP = re.compile(r"\{\{|\}\}|\{\||\|\}|\[\[|\]\]|'''|''")
BULLET = re.compile(r"^\s*(?:[-*•]|\d+\.)\s+", re.MULTILINE)
EMPHASIS = re.compile(r"(?<![\w*_])([*_]{1,2})(?=\S)(.+?)(?<=\S)\1(?![\w*_])")
EMPTY_SECTION_HEADING = re.compile(
    r"^\s*(?:References|External links|See also|Further reading|Notes|Sources|Bibliography|Footnotes)\s*$",
    re.MULTILINE | re.IGNORECASE,
)
CAPS_RUN = re.compile(r"\b[A-Z][A-Z'’.-]*[A-Z](?:\s+[A-Z][A-Z'’.-]*[A-Z])+\b")


def _capitalise_run(match: re.Match) -> str:
    return " ".join(word[0] + word[1:].lower() for word in match.group(0).split())


def clean_text(text: str) -> str:
    """Strip leftover wiki markup and return the document as a single line of prose."""
    # The substring tests skip a regex pass over documents that cannot match it.
    if "Category:" in text:
        # A page with lines ends in a trailer line of categories; a page on one line keeps its text before them.
        text = CATEGORY_LINE.sub(" ", text) if "\n" in text.strip() else CATEGORY_TAIL.sub(" ", text)
    text = EMPTY_SECTION_HEADING.sub(" ", text)
    if "{" in text:
        text = TEMPLATE.sub(" ", text)
    text = IMAGE_NAME.sub(" ", text)
    if "[" in text:
        text = REFERENCE_MARKER.sub("", text)
    text = STRAY_MARKUP.sub(" ", text)
    text = BULLET.sub("", text)
    if "_" in text or "*" in text:
        text = EMPHASIS.sub(r"\2", text)
    text = CAPS_RUN.sub(_capitalise_run, text)
    return " ".join(text.split())
