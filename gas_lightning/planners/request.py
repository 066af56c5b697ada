"""Model-free parsing of structured edit requests ("change the dog into a cat. ...").

Each sentence of the request is one subtask. Only a few fixed forms are accepted, so that a
request either parses exactly or fails with a message that shows the forms; free-text
requests are for an LLM planner, and `is_structured_request` lets the CLI route them there.
"""

from __future__ import annotations

import re
from dataclasses import replace

from gas_lightning.errors import PlannerError
from gas_lightning.plan import EditPlan

# Sentence separators: ';', newlines, and '.' except inside a number such as "1.5".
_SENTENCE_SPLIT = re.compile(r"[;\n]|(?<!\d)\.|\.(?!\d)")

# Tried in order. The source phrase is matched lazily, so it ends at the first keyword;
# "to" right after "next"/"close" is part of the phrase ("the cup next to the plate").
_FORMS = [
    re.compile(r"^(?:please\s+)?change\s+(?P<src>.+?)\s+into\s+(?P<tgt>.+)$", re.I | re.S),
    re.compile(r"^(?:please\s+)?change\s+(?P<src>.+?)(?<!\bnext)(?<!\bclose)\s+to\s+(?P<tgt>.+)$", re.I | re.S),
    re.compile(r"^(?:please\s+)?replace\s+(?P<src>.+?)\s+with\s+(?P<tgt>.+)$", re.I | re.S),
    re.compile(r"^(?:please\s+)?turn\s+(?P<src>.+?)\s+into\s+(?P<tgt>.+)$", re.I | re.S),
]

# "keep A." names an object that must not change (a keep subtask: A -> A).
_KEEP = re.compile(
    r"^(?:please\s+)?(?:keep|leave)\s+(?P<src>.+?)(?:\s+(?:unchanged|as it is|as is|intact))?$", re.I | re.S
)

ACCEPTED_FORMS = ('"change A into B"', '"change A to B"', '"replace A with B"', '"turn A into B"', '"keep A"')
EXAMPLE_REQUEST = "change the dog into a cat. replace the cup with a bowl."

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def strip_quotes(text: str) -> str:
    """Drop whitespace and one pair of matching surrounding quotes (shell/YAML leftovers)."""
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def split_sentences(text: str) -> list[str]:
    """Split a request at '.', ';' and newlines; blank pieces are dropped."""
    return [" ".join(s.split()) for s in _SENTENCE_SPLIT.split(strip_quotes(text)) if s.strip()]


def _match(sentence: str) -> tuple[str, str, bool] | None:
    """(source, target, is_keep) of one sentence, or None when no accepted form matches."""
    m = _KEEP.match(sentence)
    if m and strip_quotes(m["src"]):
        return strip_quotes(m["src"]), strip_quotes(m["src"]), True
    for form in _FORMS:
        m = form.match(sentence)
        if m:
            src, tgt = strip_quotes(m["src"]), strip_quotes(m["tgt"])
            if src and tgt:
                return src, tgt, False
    return None


def is_structured_request(text: str) -> bool:
    """True when every sentence has one of the accepted forms (so no LLM is needed)."""
    sentences = split_sentences(text) if isinstance(text, str) else []
    return bool(sentences) and all(_match(s) is not None for s in sentences)


def parse_request(text: str) -> EditPlan:
    """Turn "change A into B. replace C with D. keep E." into one subtask per sentence.

    The whole-scene sentences are the sources and the targets joined ("A and C" -> "B and D").
    """
    if not isinstance(text, str):
        raise PlannerError(f"the edit request must be text, got {type(text).__name__}")
    sentences = split_sentences(text)
    if not sentences:
        raise PlannerError(f'the edit request is empty; write one edit per sentence, e.g. "{EXAMPLE_REQUEST}"')
    sources, targets, keeps = [], [], []
    for sentence in sentences:
        matched = _match(sentence)
        if matched is None:
            raise PlannerError(
                f'could not read "{sentence}" as an edit. Write one edit per sentence in one of the forms '
                f'{", ".join(ACCEPTED_FORMS)}, e.g. "{EXAMPLE_REQUEST}" '
                "(free-form requests need an LLM planner)."
            )
        src, tgt, keep = matched
        if not keep and src.lower() == tgt.lower():
            raise PlannerError(f'"{sentence}" changes "{src}" into itself; nothing to edit.')
        sources.append(src)
        targets.append(tgt)
        keeps.append(keep)
    if all(keeps):
        raise PlannerError(
            f'the request only keeps things ({"; ".join(sentences)}); add at least one "change A into B."'
        )
    plan = EditPlan.from_lists(sources, targets)
    return plan.replace_subtasks([replace(s, penalty=False) if k else s for s, k in zip(plan.subtasks, keeps)])
