"""LLMPlanner against a real chat-completions server on 127.0.0.1 started by the test:
good and wrapped replies, malformed and hostile replies, retries, timeouts, HTTP errors,
and the API key staying out of everything but the Authorization header."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from gas_lightning.errors import PlannerError
from gas_lightning.planners.llm import LLMPlanner
from gas_lightning.planners.llm_reply import ReplyError, extract_json, parse_reply

KEY = "sk-test-S3CRET-key-0123456789"
GOOD = {
    "source_phrases": ["the brown dog", "the grass"],
    "target_phrases": ["a black cat", "snow"],
    "source_prompt": "a brown dog on the grass",
    "target_prompt": "a black cat on snow",
    "preserve_form": [0, 1],
}


class ChatServer:
    """A scripted OpenAI-compatible endpoint; records every request it receives."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.release = threading.Event()
        self.done = threading.Event()  # a stream ended (all sent, or the client hung up)
        self.sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # a followed 302 arrives as a GET
                self.do_POST()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                action = server.script.pop(0) if server.script else ("status", 500, "script exhausted")
                if action[0] == "hang":
                    server.release.wait(5)
                    return
                if action[0] in ("stream", "trickle"):
                    server.stream(self, *action)
                    return
                if action[0] == "reply":
                    status, payload = (
                        200,
                        {
                            "id": "chatcmpl-1",
                            "object": "chat.completion",
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": action[1]},
                                    "finish_reason": "stop",
                                }
                            ],
                        },
                    )
                    data = json.dumps(payload).encode()
                else:  # ("status" | "raw", code, str | bytes, headers)
                    status, data = action[1], action[2] if action[0] == "raw" else action[2].encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (action[3] if len(action) > 3 else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def stream(self, handler, kind, total, headers=None, chunk=b"x" * 65536):
        """Send a chat-completion prefix, then `total` bytes of content ("stream": as fast as the
        client reads, "trickle": one byte per 20 ms), counting what the client took."""
        handler.send_response(200)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        pieces = [b'{"choices": [{"message": {"content": "']
        try:
            while self.sent < total and not self.release.is_set():
                piece = pieces.pop() if pieces else (chunk if kind == "stream" else b"x")
                handler.wfile.write(piece)
                handler.wfile.flush()
                self.sent += len(piece)
                if kind == "trickle":
                    time.sleep(0.02)
        except OSError:
            pass
        finally:
            self.done.set()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def image():
    img = Image.new("RGB", (48, 32), (40, 160, 40))
    img.paste((120, 80, 40), (10, 8, 30, 24))
    return img


def planner(server, **kw) -> LLMPlanner:
    kw = {"timeout": 5.0, "max_retries": 2, "backoff": 0.01, **kw}
    return LLMPlanner("test-vlm", base_url=server.url, **kw)


# --- good replies ------------------------------------------------------------------------------
def test_good_reply_gives_the_plan_and_the_request_carries_image_and_model(server, image):
    server.script = [("reply", json.dumps(GOOD))]
    plan = planner(server).plan(image, "make the dog a cat and the grass snow")
    assert [(s.source, s.target, s.preserve_form, s.box) for s in plan.subtasks] == [
        ("the brown dog", "a black cat", False, None),
        ("the grass", "snow", True, None),
    ]
    assert (plan.source_prompt, plan.target_prompt) == ("a brown dog on the grass", "a black cat on snow")

    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    body = json.loads(req["body"])
    assert body["model"] == "test-vlm"
    user = body["messages"][1]["content"]
    assert any(p["type"] == "text" and "make the dog a cat" in p["text"] for p in user)
    (url,) = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.format == "PNG" and sent.size == image.size
    assert "JSON" in body["messages"][0]["content"]
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in req["body"]


@pytest.mark.parametrize(
    "content",
    [
        "Sure! Here is the plan:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nLet me know {if} you need more.",
        "I looked at the image {carefully}. " + json.dumps(GOOD) + " That's all.",
        "```\n" + json.dumps(GOOD) + "\n```",
        'Plan: {"note": "x", "plan": ' + json.dumps(GOOD) + "} done.",
    ],
)
def test_reply_wrapped_in_prose_or_markdown_is_extracted(server, image, content):
    server.script = [("reply", content)]
    plan = planner(server).plan(image, "make the dog a cat")
    assert [s.target for s in plan.subtasks] == ["a black cat", "snow"]


def test_content_given_as_parts_and_base_url_from_environment(server, image, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    parts = json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": json.dumps(GOOD)}]}}]})
    server.script = [("status", 200, parts)]
    plan = LLMPlanner("test-vlm", backoff=0.01).plan(image, "edit")
    assert len(plan.subtasks) == 2


# --- invalid replies and retries -----------------------------------------------------------------
def test_malformed_json_is_re_asked_with_the_problem(server, image):
    server.script = [("reply", '{"source_phrases": ["the dog",}'), ("reply", json.dumps(GOOD))]
    plan = planner(server).plan(image, "make the dog a cat")
    assert len(plan.subtasks) == 2 and len(server.requests) == 2
    retry = json.loads(server.requests[1]["body"])["messages"]
    assert retry[2] == {"role": "assistant", "content": '{"source_phrases": ["the dog",}'}
    assert "could not be used" in retry[3]["content"] and "no JSON object" in retry[3]["content"]


def test_always_malformed_fails_after_bounded_retries_naming_endpoint(server, image):
    server.script = [("reply", "I cannot help with that.")] * 5
    with pytest.raises(PlannerError) as err:
        planner(server, max_retries=2).plan(image, "make the dog a cat")
    msg = str(err.value)
    assert server.url + "/chat/completions" in msg and "3 attempts" in msg and "no JSON object" in msg
    assert len(server.requests) == 3


def test_wrong_list_lengths_are_rejected(server, image):
    bad = {**GOOD, "target_phrases": ["a black cat"]}
    server.script = [("reply", json.dumps(bad))]
    with pytest.raises(PlannerError, match="differ in length"):
        planner(server, max_retries=0).plan(image, "make the dog a cat")


def test_python_code_in_the_reply_is_rejected_and_never_run(server, image, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    python_dict = repr({**GOOD, "source_phrases": ["the brown dog", "the grass"]})  # single quotes: not JSON
    hostile_json = json.dumps(GOOD).replace('["the brown dog", "the grass"]', code, 1)
    server.script = [("reply", code), ("reply", python_dict), ("reply", hostile_json)]
    with pytest.raises(PlannerError, match="unusable reply"):
        planner(server, max_retries=2).plan(image, "make the dog a cat")
    assert not marker.exists() and len(server.requests) == 3


@pytest.mark.parametrize(
    "change, match",
    [
        ({"extra": 1}, "unexpected keys \\['extra'\\]"),
        ({"preserve_form": None}, "preserve_form"),
        ({"preserve_form": [2, 0]}, "0/1"),
        ({"preserve_form": [0.5, 1]}, "0/1"),
        ({"source_phrases": ["", "the grass"]}, "non-empty string"),
        ({"source_phrases": ["x" * 201, "the grass"]}, "under 200"),
        ({"target_phrases": "a black cat"}, "list of 1 to 16"),
        ({"source_phrases": [], "target_phrases": [], "preserve_form": []}, "list of 1 to 16"),
        ({"source_phrases": ["a"] * 17, "target_phrases": ["b"] * 17, "preserve_form": [0] * 17}, "1 to 16"),
        ({"source_prompt": 3}, "source_prompt"),
        ({"target_phrases": [["a"], "snow"]}, "non-empty string"),
        ({"keep_phrases": "the house"}, "keep_phrases' must be a list of 0 to 16"),
        ({"keep_phrases": ["the house", 3]}, "non-empty string"),
    ],
)
def test_parse_reply_validates_strictly(change, match):
    with pytest.raises(ReplyError, match=match):
        parse_reply(json.dumps({**GOOD, **change}))


def test_parse_reply_accepts_bools_and_missing_keys_are_named():
    plan = parse_reply(json.dumps({**GOOD, "preserve_form": [True, False]}))
    assert [s.preserve_form for s in plan.subtasks] == [True, False]
    with pytest.raises(ReplyError, match="missing keys \\['target_prompt'\\]"):
        parse_reply(json.dumps({k: v for k, v in GOOD.items() if k != "target_prompt"}))
    assert extract_json('noise {"a": 1} more') == {"a": 1}
    kept = parse_reply(json.dumps({**GOOD, "keep_phrases": ["the red house"]}))
    assert [(s.source, s.target, s.keep) for s in kept.subtasks][-1] == ("the red house", "the red house", True)
    assert len(parse_reply(json.dumps({**GOOD, "keep_phrases": []})).subtasks) == len(GOOD["source_phrases"])
    with pytest.raises(ReplyError, match="empty"):
        extract_json("   ")


# --- transport --------------------------------------------------------------------------------------
def test_server_error_then_success_and_rate_limit_are_retried(server, image):
    server.script = [
        ("status", 500, '{"error": "overloaded"}'),
        ("status", 429, "slow down"),
        ("reply", json.dumps(GOOD)),
    ]
    plan = planner(server).plan(image, "make the dog a cat")
    assert len(plan.subtasks) == 2 and len(server.requests) == 3


def test_hang_past_the_timeout_fails_fast_and_clearly(server, image):
    """The message can only name the timeout if the client gave up itself (the server would
    otherwise hang up after 5 s and the error would be a dropped connection)."""
    server.script = [("hang",)]
    with pytest.raises(PlannerError, match="no answer within 0.5 s"):
        planner(server, timeout=0.5, max_retries=0).plan(image, "make the dog a cat")
    assert len(server.requests) == 1


@pytest.mark.parametrize("code", [401, 403])
def test_unauthorized_fails_at_once_without_leaking_the_key(server, image, caplog, code):
    server.script = [("status", code, json.dumps({"error": f"invalid key Bearer {KEY}"}))] * 4
    p = planner(server, max_retries=3)
    with caplog.at_level(logging.DEBUG), pytest.raises(PlannerError) as err:
        p.plan(image, "make the dog a cat")
    msg = str(err.value)
    assert "OPENAI_API_KEY" in msg and f"HTTP {code}" in msg and KEY not in msg
    assert len(server.requests) == 1
    assert KEY not in repr(p) and KEY not in caplog.text and KEY not in repr(vars(p))


def test_key_stays_out_of_repr_logs_errors_and_plan(server, image, caplog):
    server.script = [("status", 503, f"upstream said {KEY}"), ("reply", json.dumps(GOOD))]
    p = planner(server)
    with caplog.at_level(logging.DEBUG):
        plan = p.plan(image, "make the dog a cat")
    assert KEY not in caplog.text and "503" in caplog.text
    assert KEY not in json.dumps(plan.to_dict()) and KEY not in repr(p)
    for req in server.requests:
        assert KEY not in req["body"]
        assert [k for k, v in req["headers"].items() if KEY in v] == ["Authorization"]
    server.script = [("status", 503, f"upstream said {KEY}")] * 3
    with pytest.raises(PlannerError) as err:
        planner(server, max_retries=1).plan(image, "x")
    assert KEY not in str(err.value) and "HTTP 503" in str(err.value)


def test_not_found_and_unreachable_endpoint(server, image):
    server.script = [("status", 404, "no such route")]
    with pytest.raises(PlannerError, match="--llm_base_url"):
        planner(server).plan(image, "make the dog a cat")
    closed = ChatServer()
    url = closed.url
    closed.close()
    with pytest.raises(PlannerError, match="cannot reach"):
        LLMPlanner("m", base_url=url, timeout=1, max_retries=1, backoff=0.01).plan(image, "make the dog a cat")


def test_no_key_means_no_authorization_header(server, image, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    server.script = [("reply", json.dumps(GOOD))]
    planner(server).plan(image, "make the dog a cat")
    assert "Authorization" not in server.requests[0]["headers"]


def test_constructor_checks():
    with pytest.raises(PlannerError, match="--llm_model"):
        LLMPlanner("")
    with pytest.raises(PlannerError, match="http"):
        LLMPlanner("m", base_url="ftp://example.com/v1")
    with pytest.raises(PlannerError, match="OPENAI_API_KEY") as err:
        LLMPlanner("m", base_url="https://user:hunter2@example.com/v1/")
    assert "hunter2" not in str(err.value)
    assert "https://example.com/v1/chat/completions" in repr(LLMPlanner("m", base_url="https://example.com/v1/"))
    assert LLMPlanner("m").url == "https://api.openai.com/v1/chat/completions"
    with pytest.raises(PlannerError, match="empty"):
        LLMPlanner("m").plan(Image.new("RGB", (4, 4)), "  ")


def test_gas_edit_plan_only_with_the_llm_planner_keeps_the_key_out_of_outputs(server, tmp_path, monkeypatch, capsys):
    """The whole CLI path: free-text request -> LLM plan -> explicit boxes -> plan.json, config.yaml."""
    from gas_lightning.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.script = [("reply", "Sure! ```json\n" + json.dumps(GOOD) + "\n```")]
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(image)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--image",
                str(image),
                "--request",
                "make the dog a black cat and the grass snowy",
                "--planner",
                "llm",
                "--llm_model",
                "test-model",
                "--llm_base_url",
                server.url,
                "--boxes",
                "[[0.1, 0.2, 0.5, 0.9], [0, 0.6, 1, 1]]",
                "--output_dir",
                str(out),
                "--plan_only",
                "true",
            ]
        )
    assert exit_info.value.code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert [s["target"] for s in plan["subtasks"]] == GOOD["target_phrases"]
    assert [s["preserve_form"] for s in plan["subtasks"]] == [False, True]
    for path in out.iterdir():
        assert KEY not in path.read_bytes().decode("latin-1"), path.name
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    assert json.loads(server.requests[0]["body"])["model"] == "test-model"


# --- a client to trust with a paid key ---------------------------------------------------------------
@pytest.fixture
def other():
    """A second server on another port: where a redirect points. It must never see the key."""
    s = ChatServer()
    yield s
    s.close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_never_receives_the_key(server, other, image, code):
    other.script = [("reply", json.dumps(GOOD))] * 2
    server.script = [("status", code, "", {"Location": other.url + "/chat/completions?token=abc"})] * 4
    with pytest.raises(PlannerError) as err:
        planner(server).plan(image, "make the dog a cat")
    assert other.requests == []
    assert len(server.requests) == 1  # one clear error, not retried
    msg = str(err.value)
    assert f"HTTP {code}" in msg and "redirect" in msg and other.url.split("/v1")[0] in msg
    assert "token=abc" not in msg


def test_a_redirect_on_the_same_origin_is_not_followed_either(server, image):
    server.script = [("status", 307, "", {"Location": "/v2/chat/completions"}), ("reply", json.dumps(GOOD))]
    with pytest.raises(PlannerError, match="redirect"):
        planner(server).plan(image, "make the dog a cat")
    assert len(server.requests) == 1


def test_rate_limit_and_server_errors_are_retried_with_backoff_then_fail_clearly(server, image):
    waits: list[float] = []
    server.script = [
        ("status", 429, "slow down", {"Retry-After": "3"}),
        ("status", 502, "bad gateway"),
        ("status", 503, "busy"),
        ("status", 500, "oops"),
    ]
    with pytest.raises(PlannerError) as err:
        planner(server, max_retries=3, backoff=0.5, sleep=waits.append).plan(image, "make the dog a cat")
    assert len(server.requests) == 4
    assert waits == [3.0, 1.0, 2.0]  # Retry-After first, then 0.5 * 2**1, 0.5 * 2**2
    msg = str(err.value)
    assert "4 attempts" in msg and "HTTP 500" in msg and server.url in msg


def test_retry_after_beyond_the_cap_fails_at_once(server, image):
    waits: list[float] = []
    server.script = [("status", 429, "quota", {"Retry-After": "86400"})] * 3
    with pytest.raises(PlannerError, match="86400 s") as err:
        planner(server, max_retries=2, sleep=waits.append).plan(image, "make the dog a cat")
    assert len(server.requests) == 1 and waits == []
    assert "HTTP 429" in str(err.value)


def test_a_dropped_connection_is_retried(server, image):
    closed = ChatServer()
    url = closed.url
    closed.close()
    waits: list[float] = []
    with pytest.raises(PlannerError, match="cannot reach") as err:
        LLMPlanner("m", base_url=url, timeout=1, max_retries=2, backoff=0.25, sleep=waits.append).plan(image, "x")
    assert waits == [0.25, 0.5] and "3 attempts" in str(err.value)


@pytest.mark.parametrize(
    "text",
    ["[" * 100000, "{" * 100000, '{"a": ' * 50000, '{"source_phrases": ' + "[" * 100000],
    ids=["brackets", "braces", "objects", "inside-a-plan"],
)
def test_deeply_nested_replies_are_refused_cleanly(server, image, text):
    with pytest.raises(ReplyError, match="nested"):
        extract_json(text)
    server.script = [("reply", text)]
    with pytest.raises(PlannerError, match="nested"):
        planner(server, max_retries=0).plan(image, "make the dog a cat")


def test_a_deeply_nested_envelope_is_refused_cleanly(server, image):
    server.script = [("status", 200, '{"choices": ' + "[" * 100000)]
    with pytest.raises(PlannerError, match="nested"):
        planner(server, max_retries=0).plan(image, "make the dog a cat")


def test_a_long_reply_is_refused_before_it_is_searched():
    text = "x" * 100_000 + " " + json.dumps(GOOD)
    with pytest.raises(ReplyError, match="100001 characters long"):
        extract_json(text[:100_001])
    assert extract_json(text[-99_000:]) == GOOD


def test_shallow_nesting_inside_strings_is_fine():
    plan = parse_reply(json.dumps({**GOOD, "source_prompt": "a [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ sign"}))
    assert plan.source_prompt.endswith("[ sign")
    assert extract_json('{"plan": {"source_phrases": ["a"]}}') == {"plan": {"source_phrases": ["a"]}}


MB = 1 << 20


@pytest.mark.parametrize("announce", [False, True])
def test_a_huge_reply_is_refused_without_reading_it(server, image, announce):
    """64 MB offered; the client must hang up near its 1 MB limit. Loopback socket buffers can
    take a few MB before the server's writes block, hence the generous bound."""
    headers = {"Content-Length": str(64 * MB)} if announce else {}
    server.script = [("stream", 64 * MB, headers)]
    with pytest.raises(PlannerError, match="larger than 1 MB"):
        planner(server, max_retries=2).plan(image, "make the dog a cat")
    assert server.done.wait(20)
    assert server.sent < 24 * MB
    assert len(server.requests) == 1


def test_a_compressed_huge_reply_is_refused_without_inflating_it(server, image):
    import gzip
    import tracemalloc

    body = gzip.compress(b'{"choices": [{"message": {"content": "' + b"x" * (64 * MB), compresslevel=1)
    server.script = [("raw", 200, body, {"Content-Encoding": "gzip"})]
    tracemalloc.start()
    try:
        with pytest.raises(PlannerError, match="larger than 1 MB"):
            planner(server, max_retries=0).plan(image, "make the dog a cat")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MB


def test_a_trickling_reply_is_cut_at_the_timeout(server, image):
    server.script = [("trickle", 10000)]
    with pytest.raises(PlannerError, match="within 0.5 s"):
        planner(server, timeout=0.5, max_retries=0).plan(image, "make the dog a cat")
    assert server.done.wait(10)
    assert server.sent < 5000  # 10000 bytes take 200 s; the client left long before


@pytest.mark.parametrize(
    "envelope, match",
    [
        ({"choices": [{"message": {"content": ""}}]}, "empty"),
        ({"choices": [{"message": {"content": None}}]}, "no text content"),
        ({"choices": [{"message": {"content": "null"}}]}, "no JSON object"),
        ({"choices": []}, "not a chat completion"),
        (None, "not a chat completion"),
    ],
)
def test_empty_and_null_content_fail_with_a_message(server, image, envelope, match):
    server.script = [("status", 200, json.dumps(envelope))] * 2
    with pytest.raises(PlannerError, match=match):
        planner(server, max_retries=1).plan(image, "make the dog a cat")
    assert len(server.requests) == 2


def test_the_prompt_keeps_the_pose_of_swapped_animals():
    """The reference marks pose-keeping swaps (a dog into a cat or a tiger) preserve_form 1."""
    from gas_lightning.planners.llm_prompt import SYSTEM_PROMPT

    rule = " ".join(SYSTEM_PROMPT.split())
    (line,) = [r for r in rule.split(" - ") if r.startswith("preserve_form")]
    assert "a dog into a cat" in line and "tiger" in line and "pose" in line
    assert line.index("1 ") < line.index("a dog into a cat") < line.index(" 0 ")
