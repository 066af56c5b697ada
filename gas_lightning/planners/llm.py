"""An LLM planner over any OpenAI-compatible /chat/completions endpoint (hosted, vLLM, Ollama).

Standard library only (urllib + json), so no client package is needed. The reply is treated
as untrusted data: the JSON object is cut out of whatever prose surrounds it, parsed with
json.loads and checked field by field; nothing in it is ever evaluated. The API key is read
from OPENAI_API_KEY at request time and never stored, logged or put in an error message.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from PIL import Image

from gas_lightning.errors import PlanError, PlannerError
from gas_lightning.plan import MAX_SUBTASKS, EditPlan
from gas_lightning.planners.llm_prompt import OPTIONAL_KEYS, REPLY_KEYS, SYSTEM_PROMPT, correction_text, user_text

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_PHRASE = 200
MAX_SENTENCE = 300
MAX_REQUEST = 4000
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


class ReplyError(ValueError):
    """The model's reply is unusable; the message says why (and is sent back to it)."""


class _BadCompletion(ReplyError):
    """The server's answer holds no assistant text (not the model's fault to correct)."""


class _Transient(Exception):
    """A failure worth retrying: network trouble, timeouts, HTTP 429 and 5xx."""


# --- reply parsing -----------------------------------------------------------------------------
def extract_json(text: str) -> dict[str, Any]:
    """Return the JSON object in `text`: bare, inside ``` fences, or embedded in prose."""
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("the reply was empty")
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for c in candidates:
        try:
            value = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    decoder, found = json.JSONDecoder(), []
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
            if "source_phrases" in value:
                return value
    if found:
        return found[0]
    raise ReplyError("the reply contains no JSON object")


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
        raise ReplyError(f"{' and '.join(parts)}; the keys must be {list(REPLY_KEYS)}, optionally {list(OPTIONAL_KEYS)}")
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


# --- transport ----------------------------------------------------------------------------------
def image_data_url(image: Image.Image, max_side: int = 1024) -> str:
    """PNG data URL of the image, shrunk so that its longer side is at most `max_side`."""
    img = image.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _public_url(url: str) -> str:
    """The URL without user:password or query, fit for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class LLMPlanner:
    """Ask a multimodal chat model for the subtasks of a free-text request."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_image_side: int = 1024,
    ):
        if not isinstance(model, str) or not model.strip():
            raise PlannerError("--llm_model is empty; name the chat model to ask, e.g. --llm_model gpt-4o-mini.")
        base = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
            raise PlannerError(
                f"the LLM base URL {_public_url(base)!r} is not an http(s) URL; set --llm_base_url or "
                "OPENAI_BASE_URL to e.g. http://localhost:8000/v1."
            )
        if urllib.parse.urlsplit(base).username is not None:
            raise PlannerError(
                f"the LLM base URL {_public_url(base)!r} carries a user name or password; remove them and put "
                "the API key in the OPENAI_API_KEY environment variable instead."
            )
        if not (timeout > 0 and max_retries >= 0 and backoff >= 0):
            raise PlannerError("the LLM planner needs timeout > 0, max_retries >= 0 and backoff >= 0.")
        self.model = model.strip()
        self.url = base + "/chat/completions"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_image_side = int(max_image_side)

    def __repr__(self) -> str:
        return f"LLMPlanner(model={self.model!r}, url={_public_url(self.url)!r}, timeout={self.timeout}, max_retries={self.max_retries})"

    # public --------------------------------------------------------------------------------
    def plan(self, image: Image.Image, request: str) -> EditPlan:
        """Return the plan the model proposes for `request` on `image` (boxes left to grounding)."""
        if not isinstance(request, str) or not request.strip():
            raise PlannerError("the edit request is empty; say what to change, e.g. --request 'make the dog a cat'.")
        if len(request) > MAX_REQUEST:
            raise PlannerError(f"the edit request is {len(request)} characters long; keep it under {MAX_REQUEST}.")
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": user_text(request.strip())},
                    {"type": "image_url", "image_url": {"url": image_data_url(image, self.max_image_side)}},
                ],
            },
        ]
        attempts = self.max_retries + 1
        problem = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            log.info("asking the LLM planner at %s (model %s), attempt %d/%d", _public_url(self.url), self.model, attempt + 1, attempts)
            try:
                content = self._complete(messages)
                plan = parse_reply(content)
            except _Transient as e:
                problem = str(e)
            except _BadCompletion as e:  # nothing the model said to correct: just ask again
                problem = str(e)
            except ReplyError as e:
                problem = f"unusable reply: {e}"
                messages = messages[:2] + [
                    {"role": "assistant", "content": content[:4000]},
                    {"role": "user", "content": correction_text(str(e))},
                ]
            else:
                log.info("LLM plan: %s", json.dumps(plan.to_dict()))
                return plan
            log.warning("LLM planner attempt %d/%d failed: %s", attempt + 1, attempts, problem)
        raise PlannerError(
            f"the LLM planner at {_public_url(self.url)} (model {self.model!r}) gave no usable plan after "
            f"{attempts} attempts; last problem: {problem}. Check that the server is up and serves that model "
            "(--llm_base_url / OPENAI_BASE_URL, --llm_model), or write the request as 'change A into B. ...'."
        )

    # transport -----------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        key = os.environ.get("OPENAI_API_KEY")
        return text.replace(key, "***") if key else text

    def _complete(self, messages: list[dict[str, Any]]) -> str:
        """One POST; returns the assistant's text, raises _Transient / ReplyError / PlannerError."""
        # no temperature: some hosted reasoning models reject any value but their default
        body = json.dumps({"model": self.model, "messages": messages}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Transient(f"no answer within {self.timeout:g} s") from None
            raise _Transient(self._redact(f"cannot reach the endpoint ({reason})")) from None
        except (socket.timeout, TimeoutError):
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Transient(self._redact(f"connection failed ({type(e).__name__}: {e})")) from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _BadCompletion(self._redact(f"the server's answer is not a chat completion: {raw[:200]!r}")) from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _BadCompletion("the chat completion has no text content")
        return content

    def _http_error(self, e: urllib.error.HTTPError) -> Exception:
        try:
            detail = " ".join(e.read(300).decode("utf-8", "replace").split())
        except Exception:
            detail = ""
        detail = self._redact(detail)
        status = f"HTTP {e.code}" + (f": {detail}" if detail else "")
        if e.code == 429 or e.code >= 500:
            return _Transient(status)
        url = _public_url(self.url)
        if e.code in (401, 403):
            return PlannerError(
                f"the LLM endpoint {url} refused the request ({status}); check OPENAI_API_KEY "
                "(set it in the environment; local servers usually need none)."
            )
        if e.code == 404:
            return PlannerError(
                f"the LLM endpoint {url} answered {status}; check --llm_base_url / OPENAI_BASE_URL "
                f"(it usually ends in /v1) and that the server serves --llm_model {self.model!r}."
            )
        return PlannerError(f"the LLM endpoint {url} rejected the request ({status}); check --llm_model {self.model!r}.")
