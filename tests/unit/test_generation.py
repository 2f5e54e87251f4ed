"""The OpenAI-compatible generator against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pipelines.answering import NO_ANSWER
from pipelines.errors import PermanentError, TransientError
from pipelines.generation import CANNOT_ANSWER, OpenAICompatibleGenerator, parse_reply
from pipelines.types import Passage

PASSAGES = [
    Passage(
        chunk_id=11,
        document_id="doc-a",
        filename="2023 Q3 AAPL.pdf",
        page=4,
        text="Total net sales were $81,797 million for the quarter ended July 1, 2023.",
        score=0.91,
    ),
    Passage(
        chunk_id=12,
        document_id="doc-a",
        filename="2023 Q3 AAPL.pdf",
        page=9,
        text="iPhone net sales decreased during the third quarter of 2023.",
        score=0.72,
    ),
    Passage(
        chunk_id=40,
        document_id="doc-b",
        filename="norwich-city.txt",
        page=None,
        text="Roberts scored 84 league goals for Norwich City.",
        score=0.15,
    ),
]


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    body: bytes | None = None
    delay_s: float = 0.0


@dataclass
class FakeLLM:
    """A canned chat-completions server: replies are served in order, requests recorded."""

    url: str
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)


def _completion(content: str | None) -> bytes:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    state = FakeLLM(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length", "0"))
            state.requests.append(
                {
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "json": json.loads(self.rfile.read(length)),
                }
            )
            reply = state.replies.pop(0) if state.replies else Reply(status=500)
            time.sleep(reply.delay_s)
            body = reply.body if reply.body is not None else _completion(reply.content)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout case)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _generator(llm: FakeLLM, *, timeout: float = 5.0) -> OpenAICompatibleGenerator:
    return OpenAICompatibleGenerator(
        base_url=llm.url + "/", model="tiny-chat", api_key="sk-test", timeout=timeout
    )


def test_cited_answer_is_parsed_into_citations(llm: FakeLLM) -> None:
    llm.replies.append(
        Reply(content="Net sales were $81,797 million [1], with iPhone sales down [2] [9].")
    )
    with _generator(llm) as generator:
        answer = generator.generate("What were Apple's net sales?", PASSAGES)
    assert answer.answered
    assert answer.answer == "Net sales were $81,797 million [1], with iPhone sales down [2]."
    cited = [(c.chunk_id, c.page, c.score) for c in answer.citations]
    assert cited == [(11, 4, 0.91), (12, 9, 0.72)]
    assert answer.citations[0].quote == PASSAGES[0].text

    request = llm.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-test"
    body = request["json"]
    assert body["model"] == "tiny-chat" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "[1] (2023 Q3 AAPL.pdf, page 4)\nTotal net sales" in user
    assert "[3] (norwich-city.txt)\nRoberts" in user
    assert user.endswith("Question: What were Apple's net sales?")


def test_markers_are_renumbered_in_order_of_first_citation(llm: FakeLLM) -> None:
    llm.replies.append(Reply(content="Roberts scored 84 goals [3]; sales fell [2, 3]."))
    answer = _generator(llm).generate("Goals?", PASSAGES)
    assert answer.answer == "Roberts scored 84 goals [1]; sales fell [2][1]."
    assert [c.chunk_id for c in answer.citations] == [40, 12]


@pytest.mark.parametrize(
    "content",
    [
        CANNOT_ANSWER,
        "I cannot answer this from the passages.",
        "The passages do not say anything about dividends [1].",
        "Dividends were raised last year.",  # no citation at all
        "Dividends were raised [7].",  # cites a passage that does not exist
        "",
        None,
    ],
)
def test_refusals_and_uncited_replies_are_not_answers(llm: FakeLLM, content: str | None) -> None:
    llm.replies.append(Reply(content=content))
    answer = _generator(llm).generate("What dividend was paid?", PASSAGES)
    assert (answer.answered, answer.answer, answer.citations) == (False, NO_ANSWER, [])


def test_server_error_is_transient(llm: FakeLLM) -> None:
    llm.replies.append(Reply(status=500, body=b'{"error": "overloaded"}'))
    with pytest.raises(TransientError) as caught:
        _generator(llm).generate("q", PASSAGES)
    assert caught.value.code == "llm_unavailable"


def test_rate_limit_is_transient_but_bad_request_is_permanent(llm: FakeLLM) -> None:
    llm.replies += [
        Reply(status=429, body=b"{}"),
        Reply(status=400, body=b'{"error": "bad model"}'),
    ]
    generator = _generator(llm)
    with pytest.raises(TransientError):
        generator.generate("q", PASSAGES)
    with pytest.raises(PermanentError) as caught:
        generator.generate("q", PASSAGES)
    assert caught.value.code == "llm_rejected"
    assert "bad model" in caught.value.message


def test_timeout_is_transient(llm: FakeLLM) -> None:
    llm.replies.append(Reply(content="late [1]", delay_s=1.0))
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        _generator(llm, timeout=0.2).generate("q", PASSAGES)
    assert caught.value.code == "llm_unavailable"
    assert time.monotonic() - started < 0.9


def test_unreachable_server_is_transient(llm: FakeLLM) -> None:
    generator = OpenAICompatibleGenerator(
        base_url="http://127.0.0.1:9", model="m", api_key=None, timeout=1.0
    )
    with pytest.raises(TransientError):
        generator.generate("q", PASSAGES)


def test_malformed_body_is_a_bad_response(llm: FakeLLM) -> None:
    llm.replies.append(Reply(body=b"<html>proxy error</html>"))
    with pytest.raises(TransientError) as caught:
        _generator(llm).generate("q", PASSAGES)
    assert caught.value.code == "llm_bad_response"


def test_no_passages_means_no_request(llm: FakeLLM) -> None:
    answer = _generator(llm).generate("q", [])
    assert not answer.answered and llm.requests == []


def test_parse_reply_without_a_server() -> None:
    answer = parse_reply("Sales were $81.8B [1][1].", PASSAGES)
    assert answer.answer == "Sales were $81.8B [1][1]." and len(answer.citations) == 1
