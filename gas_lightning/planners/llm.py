"""An LLM planner over any OpenAI-compatible /chat/completions endpoint (hosted, vLLM, Ollama).

The reply is untrusted data, read by `llm_reply` (bounded in size and nesting, parsed with
json.loads, checked field by field, never evaluated); this module is the transport. The API key is read from OPENAI_API_KEY at request time,
sent only to the origin the user named (redirects are refused, not followed) and never stored,
logged or put in an error message. Transport is httpx, so timeouts and streaming are its own.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import os
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any

import httpx
from PIL import Image

from gas_lightning.errors import PlannerError
from gas_lightning.plan import EditPlan
from gas_lightning.planners.llm_prompt import SYSTEM_PROMPT, correction_text, user_text
from gas_lightning.planners.llm_reply import BadCompletion, ReplyError, check_depth, parse_reply

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_REQUEST = 4000
MAX_REPLY_BYTES = 1 << 20  # a plan is a few kB; more is a wrong endpoint or a hostile one
MAX_WAIT = 60.0  # longest pause between attempts (backoff or Retry-After); longer asks fail at once
CONNECT_TIMEOUT = 10.0


class _Transient(Exception):
    """A failure worth retrying: network trouble, timeouts, HTTP 408, 429 and 5xx."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


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
    """The URL without user:password, query or fragment, fit for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(an unreadable URL)"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_base_url(url: str | None) -> None:
    """Refuse a base URL that carries credentials, before config.yaml or a log can record it."""
    if url is None or not url.strip():  # unset: OPENAI_BASE_URL or the default applies
        return
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise PlannerError(
            "the LLM base URL (--llm_base_url / OPENAI_BASE_URL) is not a valid URL; "
            "give e.g. http://localhost:8000/v1."
        ) from None
    if "@" in url or parts.query or parts.fragment:
        raise PlannerError(
            "the LLM base URL (--llm_base_url / OPENAI_BASE_URL) carries a user name, password or query string; "
            "it was not used or saved. Give the plain address (e.g. https://api.openai.com/v1) and put the API "
            "key in the OPENAI_API_KEY environment variable instead."
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PlannerError(
            "the LLM base URL (--llm_base_url / OPENAI_BASE_URL) is not an http(s) URL; "
            "give e.g. http://localhost:8000/v1."
        )


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MB" if n >= 1 << 20 else f"{n / 1024:g} kB"


class LLMPlanner:
    """Ask a multimodal chat model for the subtasks of a free-text request.

    Args:
        timeout: seconds for the whole answer (and for each network wait).
        max_retries: further attempts after network errors, HTTP 408/429/5xx and unusable replies.
        backoff: first pause between attempts; it doubles, up to MAX_WAIT. Retry-After is honoured.
        max_reply_bytes: larger answers are refused as they stream in.
        sleep: how to pause (tests pass a recorder).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_image_side: int = 1024,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not isinstance(model, str) or not model.strip():
            raise PlannerError("--llm_model is empty; name the chat model to ask, e.g. --llm_model gpt-4o-mini.")
        base = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        check_base_url(base)
        if not (timeout > 0 and max_retries >= 0 and backoff >= 0 and max_reply_bytes > 0):
            raise PlannerError(
                "the LLM planner needs timeout > 0, max_retries >= 0, backoff >= 0 and max_reply_bytes > 0."
            )
        self.model = model.strip()
        self.url = base + "/chat/completions"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_image_side = int(max_image_side)
        self.max_reply_bytes = int(max_reply_bytes)
        self._sleep = sleep

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
        url, attempts = _public_url(self.url), self.max_retries + 1
        problem, wait = "no attempt made", 0.0
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT))
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for attempt in range(attempts):
                if attempt:
                    self._sleep(wait)
                log.info(
                    "asking the LLM planner at %s (model %s), attempt %d/%d", url, self.model, attempt + 1, attempts
                )
                wait = min(self.backoff * 2**attempt, MAX_WAIT)
                try:
                    content = self._complete(client, messages)
                    plan = parse_reply(content)
                except _Transient as e:
                    problem = str(e)
                    if e.retry_after is not None and e.retry_after > MAX_WAIT:
                        raise PlannerError(
                            f"the LLM endpoint {url} asks to wait {e.retry_after:.0f} s before the next request "
                            f"({problem}); try again later or use another endpoint or key."
                        ) from None
                    wait = max(wait, e.retry_after or 0.0)
                except BadCompletion as e:  # nothing the model said to correct: just ask again
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
            f"the LLM planner at {url} (model {self.model!r}) gave no usable plan after "
            f"{attempts} attempts; last problem: {problem}. Check that the server is up and serves that model "
            "(--llm_base_url / OPENAI_BASE_URL, --llm_model), or write the request as 'change A into B. ...'."
        )

    # transport -----------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        key = os.environ.get("OPENAI_API_KEY")
        return text.replace(key, "***") if key else text

    def _complete(self, client: httpx.Client, messages: list[dict[str, Any]]) -> str:
        """One POST; returns the assistant's text, raises _Transient / ReplyError / PlannerError."""
        # no temperature: some hosted reasoning models reject any value but their default
        body = json.dumps({"model": self.model, "messages": messages}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        deadline = time.monotonic() + self.timeout
        try:
            with client.stream("POST", self.url, content=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise self._http_error(resp, deadline)
                raw = self._read(resp, self.max_reply_bytes, deadline)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except httpx.ConnectError as e:
            raise _Transient(self._redact(f"cannot reach the endpoint ({e})")) from None
        except httpx.TransportError as e:
            raise _Transient(self._redact(f"the connection failed ({type(e).__name__}: {e})")) from None
        try:
            text = raw.decode("utf-8")
            check_depth(text)
            data = json.loads(text)
            content = data["choices"][0]["message"]["content"]
        except ReplyError as e:
            raise BadCompletion(f"the server's answer is not a chat completion: {e}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise BadCompletion(self._redact(f"the server's answer is not a chat completion: {raw[:200]!r}")) from None
        if isinstance(content, list):  # content parts
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        if not isinstance(content, str):
            raise BadCompletion("the chat completion has no text content")
        return content

    def _read(self, resp: httpx.Response, limit: int, deadline: float, truncate: bool = False) -> bytes:
        """The body, streamed and stopped at `limit` bytes (after decompression) or at the deadline."""
        length = resp.headers.get("Content-Length", "")
        if not truncate and length.isdigit() and int(length) > limit:
            raise self._too_large(limit)
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding in ("gzip", "x-gzip", "deflate") else None
        if inflater is None and encoding not in ("", "identity"):
            raise BadCompletion(f"the server compressed its answer with {encoding!r}, which this client does not read")
        out = bytearray()
        for chunk in resp.iter_raw():
            if inflater is not None:
                try:
                    chunk = inflater.decompress(chunk, limit + 1 - len(out))  # never inflates past the limit
                except zlib.error:
                    raise BadCompletion("the server's compressed answer is corrupt") from None
            out += chunk
            if len(out) > limit:
                if truncate:
                    return bytes(out[:limit])
                raise self._too_large(limit)
            if time.monotonic() > deadline:
                raise _Transient(f"no complete answer within {self.timeout:g} s")
        return bytes(out)

    def _too_large(self, limit: int) -> PlannerError:
        return PlannerError(
            f"the LLM endpoint {_public_url(self.url)} sent an answer larger than {_size(limit)} and it was refused "
            "(a plan is a few kB); check that --llm_base_url / OPENAI_BASE_URL names a chat-completions API."
        )

    def _http_error(self, resp: httpx.Response, deadline: float) -> Exception:
        url, code = _public_url(self.url), resp.status_code
        if 300 <= code < 400:
            location = resp.headers.get("Location")
            target = _public_url(urllib.parse.urljoin(self.url, location)) if location else "an unnamed address"
            return PlannerError(
                f"the LLM endpoint {url} answered HTTP {code}, a redirect to {target}. Redirects are not followed, "
                "so that the API key only goes to the address you named; set --llm_base_url / OPENAI_BASE_URL "
                "to the final address (it usually ends in /v1)."
            )
        try:
            detail = self._read(resp, 300, deadline, truncate=True).decode("utf-8", "replace")
        except (httpx.HTTPError, _Transient, ReplyError):
            detail = ""
        detail = self._redact(" ".join(detail.split()))
        status = f"HTTP {code}" + (f": {detail}" if detail else "")
        if code in (408, 429) or code >= 500:
            return _Transient(status, _retry_after(resp.headers.get("Retry-After")))
        if code in (401, 403):
            return PlannerError(
                f"the LLM endpoint {url} refused the request ({status}); check OPENAI_API_KEY "
                "(set it in the environment; local servers usually need none)."
            )
        if code == 404:
            return PlannerError(
                f"the LLM endpoint {url} answered {status}; check --llm_base_url / OPENAI_BASE_URL "
                f"(it usually ends in /v1) and that the server serves --llm_model {self.model!r}."
            )
        return PlannerError(
            f"the LLM endpoint {url} rejected the request ({status}); check --llm_model {self.model!r}."
        )
