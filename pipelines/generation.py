"""Answers written by a language model behind an OpenAI-compatible ``/chat/completions`` API.

The model sees the numbered passages and must cite them as ``[n]``; an answer that cites
nothing real is treated as no answer, so an uncited claim never reaches a user.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx

from pipelines.answering import NO_ANSWER, no_answer
from pipelines.errors import PermanentError, TransientError
from pipelines.types import Answer, Citation, Passage

CANNOT_ANSWER = "CANNOT_ANSWER"
"""The reply the model is told to give when the passages do not answer the question."""

SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages you are given. "
    "Cite every statement with the number of the passage it comes from, in square brackets, "
    "like [1] or [2][3]. Be brief. Do not use outside knowledge. If the passages do not "
    f"answer the question, reply with exactly {CANNOT_ANSWER} and nothing else."
)
DEFAULT_TIMEOUT_S = 60.0
MAX_PASSAGE_CHARS = 2_000
QUOTE_CHARS = 300
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
"""4xx statuses that mean "try again later" rather than "this request is wrong"."""

_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
# A refusal is the marker anywhere, or a reply that opens by declining; a partial answer
# that mentions what the passages lack ("... does not say X, but [1] ...") still counts.
_REFUSALS = re.compile(
    rf"{CANNOT_ANSWER}"
    r"|^\W*(?:I\s+)?(?:cannot|can't|can not|am unable to|unable to|don't know|do not know)\b"
    r"|^\W*(?:the\s+)?(?:provided\s+)?(?:passages|documents|context|sources)\s+(?:do|does)\s+not\b",
    re.IGNORECASE,
)


def format_passages(passages: Sequence[Passage], *, max_chars: int = MAX_PASSAGE_CHARS) -> str:
    """Number the passages from 1, each under a line naming its source."""
    blocks = []
    for number, passage in enumerate(passages, start=1):
        source = passage.filename + (f", page {passage.page}" if passage.page is not None else "")
        blocks.append(f"[{number}] ({source})\n{passage.text[:max_chars].strip()}")
    return "\n\n".join(blocks)


def build_messages(question: str, passages: Sequence[Passage]) -> list[dict[str, str]]:
    user = f"Passages:\n\n{format_passages(passages)}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_reply(reply: str, passages: Sequence[Passage]) -> Answer:
    """Turn the model's text into an :class:`Answer` with one citation per cited passage.

    Citations follow the order of first mention and the markers in the text are renumbered to
    index them (the model's ``[3]`` may become ``[1]``). Markers out of range are dropped. A
    refusal, or a reply without one valid citation, is :data:`NO_ANSWER`.
    """
    text = reply.strip()
    if not text or _REFUSALS.search(text):
        return no_answer()
    order: list[int] = []  # passage indices, by first citation
    for match in _CITATION.finditer(text):
        for number in re.findall(r"\d+", match.group(1)):
            index = int(number) - 1
            if 0 <= index < len(passages) and index not in order:
                order.append(index)
    if not order:
        return no_answer()
    renumber = {index + 1: position for position, index in enumerate(order, start=1)}

    def rewrite(match: re.Match[str]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        return "".join(f"[{renumber[n]}]" for n in numbers if n in renumber)

    answer = re.sub(r"[ \t]+([.,;:])", r"\1", _CITATION.sub(rewrite, text)).strip()
    return Answer(answer=answer, citations=[_cite(passages[i]) for i in order], answered=True)


def _cite(passage: Passage) -> Citation:
    quote = passage.text.strip()
    if len(quote) > QUOTE_CHARS:
        quote = quote[:QUOTE_CHARS].rsplit(" ", 1)[0] + " …"
    return Citation(
        document_id=passage.document_id,
        filename=passage.filename,
        page=passage.page,
        chunk_id=passage.chunk_id,
        score=passage.score,
        quote=quote,
    )


class OpenAICompatibleGenerator:
    """A :class:`~pipelines.answering.Generator` calling ``{base_url}/chat/completions``.

    Network errors, timeouts, 5xx and 408/409/425/429 raise :class:`TransientError` (code
    ``llm_unavailable``); any other 4xx raises :class:`PermanentError` (code ``llm_rejected``);
    a 2xx body that is not a chat completion raises :class:`TransientError`
    (``llm_bad_response``). Pass ``client`` to share a connection pool; otherwise one is made
    on first use and closed by :meth:`close`.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        client: httpx.Client | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key
        self._timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._temperature = temperature
        self._max_tokens = max_tokens

    def generate(self, question: str, passages: Sequence[Passage]) -> Answer:
        if not passages:
            return no_answer()
        payload = {
            "model": self._model,
            "messages": build_messages(question, passages),
            "temperature": self._temperature,
            "max_tokens": self._max_tokens,
        }
        return parse_reply(self._complete(payload), passages)

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> OpenAICompatibleGenerator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self._timeout)
        return self._client

    def _complete(self, payload: dict[str, Any]) -> str:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            response = self._http().post(
                self._url, json=payload, headers=headers, timeout=self._timeout
            )
        except httpx.TimeoutException as exc:
            raise TransientError(f"LLM timed out: {exc!r}", code="llm_unavailable") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"LLM unreachable: {exc!r}", code="llm_unavailable") from exc
        _raise_for_status(response)
        return _reply_text(response)


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = response.text[:500]
    if status >= 500 or status in RETRYABLE_STATUS:
        raise TransientError(f"LLM answered {status}: {detail}", code="llm_unavailable")
    raise PermanentError(f"LLM rejected the request ({status}): {detail}", code="llm_rejected")


def _reply_text(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise TransientError(
            f"LLM reply is not a chat completion: {response.text[:500]}", code="llm_bad_response"
        ) from exc
    if content is None:
        return ""
    if not isinstance(content, str):
        raise TransientError("LLM reply content is not text", code="llm_bad_response")
    return content


__all__ = [
    "CANNOT_ANSWER",
    "NO_ANSWER",
    "OpenAICompatibleGenerator",
    "build_messages",
    "format_passages",
    "parse_reply",
]
