"""Cleaning Wikipedia-style text into plain running prose.

Design decisions:
- Pure functions on one document at a time, so `datasets.map` can run them in parallel and tests can
  feed them literal strings.
- Only markup that is never prose is removed: `[12]`-style reference markers, `Category:` trailers,
  image file names, template fragments (`{{...}}`, stray `}}`), list bullets and markdown emphasis.
- Whole lines that are never prose go before the newlines do: tables (grid and pipe rows, wiki table
  syntax, and the blocks around an indented or multi-column dash rule, as text exports write simple
  tables; a bare horizontal rule goes alone), footnote lines (`[3] Smith, J. ...`), gallery lines
  (`File:Bay.jpg|Caption File:...`), and everything from the first appendix heading on ("References", "See also",
  "Further reading", Simple English Wikipedia's "Related pages" and "Other websites", ...), which Wikipedia's
  layout puts after the article's prose. In the shared Wikipedia sample they were 23% of the tokens.
- Headings and list items stay, sentences or not: dropping those that are not sentences (9% of the characters
  left) moved held-out prose by -0.03 nats and BLiMP by -0.5 at 4.9M tokens (docs/measurements.md), no win.
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
APPENDIX_HEADING = re.compile(
    r"^[ \t]*=*[ \t]*(?:References|External links|See also|Further reading|Notes|Sources|Bibliography|Footnotes|"
    r"Citations|Related pages|Other websites)[ \t]*=*[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
TABLE_ROW_START = ("|", "+-", "+=", "{|")
DASH_RULE = re.compile(r"^\s*-{2,}(?:\s+-{2,})*\s*$")
FOOTNOTE_LINE = re.compile(r"^\s*\[\d+\]")
GALLERY_LINE = re.compile(r"^\s*(?:File|Image):", re.IGNORECASE)
CAPS_RUN = re.compile(r"\b[A-Z][A-Z'’.-]*[A-Z](?:\s+[A-Z][A-Z'’.-]*[A-Z])+\b")


def _capitalise_run(match: re.Match) -> str:
    return " ".join(word[0] + word[1:].lower() for word in match.group(0).split())


def _drop_non_prose_lines(text: str) -> str:
    """The document without its appendices, tables, footnote and gallery lines (a page written on one line has none)."""
    appendix = APPENDIX_HEADING.search(text)
    if appendix:
        text = text[: appendix.start()]
    lines = text.split("\n")
    dropped = [line.lstrip().startswith(TABLE_ROW_START) or bool(FOOTNOTE_LINE.match(line) or GALLERY_LINE.match(line))
               for line in lines]
    for index, line in enumerate(lines):
        if DASH_RULE.match(line):
            dropped[index] = True
            if not (line[:1].isspace() or len(line.split()) > 1):
                continue  # a bare rule at the line's start is a horizontal rule: the prose beside it stays
            # A table's rule (indented, or one dash run per column): its header above and its rows below, up
            # to a blank line. Each walk stops where another rule's walk covers, so the pass stays linear.
            above = index - 1
            while above >= 0 and lines[above].strip() and not dropped[above]:
                dropped[above] = True
                above -= 1
            below = index + 1
            while below < len(lines) and lines[below].strip() and not DASH_RULE.match(lines[below]):
                dropped[below] = True
                below += 1
    return "\n".join(line for line, drop in zip(lines, dropped) if not drop)


def clean_text(text: str) -> str:
    """Strip leftover wiki markup and return the document as a single line of prose."""
    if "\n" in text.strip():
        text = _drop_non_prose_lines(text)
    # The substring tests skip a regex pass over documents that cannot match it.
    if "Category:" in text:
        # A page with lines ends in a trailer line of categories; a page on one line keeps its text before them.
        text = CATEGORY_LINE.sub(" ", text) if "\n" in text.strip() else CATEGORY_TAIL.sub(" ", text)
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
