"""Reading an LLM planner's reply: untrusted text in, a checked EditPlan out.

The reply's size and nesting are bounded before anything is parsed, the JSON object is cut out
of whatever prose surrounds it, parsed with json.loads and checked field by field; nothing in
it is ever evaluated.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gas_lightning.errors import PlanError
from gas_lightning.plan import MAX_SUBTASKS, EditPlan
from gas_lightning.planners.llm_prompt import OPTIONAL_KEYS, REPLY_KEYS

MAX_PHRASE = 200
MAX_SENTENCE = 300
MAX_REPLY_CHARS = 100_000  # prose to search for JSON; the search costs up to depth x length
MAX_DEPTH = 32  # a plan nests 2 deep; json.loads recurses once per level
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)  # a JSON string (maybe unterminated) or a bracket
_OBJECT = re.compile(r'\{\s*["}]')  # where a JSON object can start


class ReplyError(ValueError):
    """The model's reply is unusable; the message says why (and is sent back to it)."""


class BadCompletion(ReplyError):
    """The server's answer holds no assistant text (not the model's fault to correct)."""


# --- reply parsing -----------------------------------------------------------------------------
def check_depth(text: str, start: int = 0) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH before json parses it (it recurses per level, so
    "[" * 100000 would end in RecursionError). Tokenizes strings as the parser does and stops
    where the value that starts at `start` closes."""
    depth = 0
    for m in _TOKEN.finditer(text, start):
        bracket = m.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ReplyError(f"the JSON is nested deeper than {MAX_DEPTH} levels; a plan needs 2")
        elif bracket in "]}":
            depth -= 1
            if depth <= 0:
                return


def extract_json(text: str) -> dict[str, Any]:
    """Return the JSON object in `text`: bare, inside ``` fences, or embedded in prose."""
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("the reply was empty")
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for c in candidates:
        check_depth(c)
        try:
            value = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    if len(text) > MAX_REPLY_CHARS:
        raise ReplyError(f"the reply is {len(text)} characters long; give only the JSON object (a few thousand)")
    decoder, found, resume = json.JSONDecoder(), [], 0
    for start in (m.start() for m in _OBJECT.finditer(text)):
        if start < resume:  # inside an object already read: its inner objects were searched below
            continue
        check_depth(text, start)
        try:
            value, resume = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        plan = _find_plan(value)
        if plan is not None:
            return plan
        found.append(value)
    if found:
        return found[0]
    raise ReplyError("the reply contains no JSON object")


def _find_plan(value: Any) -> dict[str, Any] | None:
    """The first object (in text order) holding "source_phrases", e.g. a plan wrapped as {"plan": {...}}."""
    if isinstance(value, dict):
        if "source_phrases" in value:
            return value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            if (plan := _find_plan(item)) is not None:
                return plan
    return None


def _strings(data: dict[str, Any], key: str, limit: int, least: int = 1) -> list[str]:
    values = data[key]
    if not isinstance(values, list) or not least <= len(values) <= MAX_SUBTASKS:
        raise ReplyError(f"'{key}' must be a list of {least} to {MAX_SUBTASKS} strings")
    return [_string(v, f"'{key}' entry {i}", limit) for i, v in enumerate(values)]


def _string(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReplyError(f"{what} must be a non-empty string, got {json.dumps(value)[:60]}")
    if len(value) > limit:
        raise ReplyError(f"{what} is {len(value)} characters long; keep it under {limit}")
    return " ".join(value.split())


def parse_reply(text: str) -> EditPlan:
    """Validate the model's JSON strictly and build the plan (no boxes yet)."""
    data = extract_json(text)
    missing = [k for k in REPLY_KEYS if k not in data]
    extra = sorted(set(data) - set(REPLY_KEYS) - set(OPTIONAL_KEYS))
    if missing or extra:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else [])
        raise ReplyError(
            f"{' and '.join(parts)}; the keys must be {list(REPLY_KEYS)}, optionally {list(OPTIONAL_KEYS)}"
        )
    keep = _strings(data, "keep_phrases", MAX_PHRASE, least=0) if "keep_phrases" in data else []
    sources = _strings(data, "source_phrases", MAX_PHRASE)
    targets = _strings(data, "target_phrases", MAX_PHRASE)
    flags = data["preserve_form"]
    if not isinstance(flags, list) or not all(isinstance(f, bool) or (type(f) is int and f in (0, 1)) for f in flags):
        raise ReplyError("'preserve_form' must be a list of 0/1 values")
    if not len(sources) == len(targets) == len(flags):
        raise ReplyError(
            f"the lists differ in length ({len(sources)} source_phrases, {len(targets)} target_phrases, "
            f"{len(flags)} preserve_form); give one entry per subtask in each"
        )
    try:
        plan = EditPlan.from_lists(
            sources,
            targets,
            source_prompt=_string(data["source_prompt"], "'source_prompt'", MAX_SENTENCE),
            target_prompt=_string(data["target_prompt"], "'target_prompt'", MAX_SENTENCE),
            preserve_form=[bool(f) for f in flags],
        )
        return plan.with_keep(keep) if keep else plan
    except PlanError as e:
        raise ReplyError(str(e)) from None
