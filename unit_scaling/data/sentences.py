"""Paragraph and sentence splitting for plain text.

A small rule-based splitter: good enough to give BERT's next-sentence prediction real
sentence boundaries in English prose, with no model to download. It splits after
`.`, `!` or `?` (plus any closing quotes or brackets) when whitespace and an
upper-case letter, digit or opening quote follow, except after a common abbreviation
("Mr.", "e.g.") or a single-letter initial ("J. Smith").
"""

from __future__ import annotations

import re

# Lower-cased, without the final period. Kept short: a wrong split costs little (a
# sentence cut in two), a missed abbreviation costs the same.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no fig figs inc ltd co corp jan feb "
    "mar apr jun jul aug sep sept oct nov dec gen col lt sgt capt rev hon mt ft approx "
    "dept est vol ed eds al u.s u.k".split()
)
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")
_NEXT_START = re.compile(r"[A-Z0-9\"'\u201c\u2018(\[]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_WHITESPACE = re.compile(r"\s+")


def split_paragraphs(text: str) -> list[str]:
    """Splits `text` on blank lines; each paragraph has its line breaks folded to spaces.

    Returns the non-empty paragraphs in order, whitespace-normalised.
    """
    paragraphs = (_WHITESPACE.sub(" ", p).strip() for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


def split_sentences(paragraph: str) -> list[str]:
    """Splits one paragraph into sentences (rule-based, English punctuation).

    Returns the non-empty, stripped sentences in order; their concatenation with single
    spaces is the whitespace-normalised paragraph.
    """
    paragraph = _WHITESPACE.sub(" ", paragraph).strip()
    sentences, start = [], 0
    for match in _END.finditer(paragraph):
        end = match.end()
        if end >= len(paragraph) or not _NEXT_START.match(paragraph, end):
            continue
        if paragraph[match.start()] == "." and _ends_with_abbreviation(
            paragraph[start : match.start()]
        ):
            continue
        sentences.append(paragraph[start:end].strip())
        start = end
    sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def split_text(text: str) -> list[str]:
    """Paragraphs on blank lines, then sentences inside each: the sentences of `text`."""
    return [s for p in split_paragraphs(text) for s in split_sentences(p)]


def _ends_with_abbreviation(prefix: str) -> bool:
    words = prefix.rsplit(None, 1)
    if not words:
        return False
    last = words[-1].lstrip("\"'(\u201c\u2018[").lower()
    # A single letter is an initial ("J. Smith"), not the end of a sentence.
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())
