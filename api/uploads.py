"""Streaming multipart uploads: the file part's bytes go to the blob store as they arrive.

Starlette's `UploadFile` parses the whole body into a spooled temporary file before the route
runs, so a size limit checked afterwards has already cost the disk and the time. Here the body
is fed to python-multipart's push parser chunk by chunk and the file part's data is yielded
straight on; the caller (the blob store) counts, hashes and stops at its limit mid-stream.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError

FILE_FIELD = "file"
FILENAME_MAX_BYTES = 255
FORM_FIELDS_MAX_BYTES = 64 * 1024
"""Bytes of other (non-file) form fields tolerated and discarded."""
MAX_PART_HEADER_BYTES = 16 * 1024
_FILENAME_STAR = re.compile(rb"filename\*\s*=\s*([\w!#$&+.^`|~-]+)'[\w-]*'([^;\s]+)", re.I)


def clean_filename(raw: str | None) -> str:
    """A safe display name for a client's file name: no directories (either slash), no control
    or format characters, NFC-normalised, no leading dots, at most 255 UTF-8 bytes with the
    extension kept. Never used as a path: blobs are stored by hash."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] not in "CZ" or ch == " ")
    name = " ".join(name.split()).lstrip(". ")
    if not name:
        return "upload"
    if len(name.encode()) <= FILENAME_MAX_BYTES:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    budget = FILENAME_MAX_BYTES - len(ext.encode()) - (1 if ext else 0)
    stem = stem.encode()[:budget].decode(errors="ignore")
    return f"{stem}.{ext}" if ext else stem


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_size: int = 0
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None

    def disposition(self) -> None:
        header = self.headers.get(b"content-disposition", b"")
        _, options = parse_options_header(header)
        self.name = _text(options.get(b"name"))
        self.filename = _text(options.get(b"filename"))
        if star := _FILENAME_STAR.search(header):  # RFC 5987 `filename*=UTF-8''r%C3%A9sum%C3%A9`
            charset = star.group(1).decode("ascii")
            with contextlib.suppress(LookupError):  # unknown charset: keep the plain name
                self.filename = urllib.parse.unquote(star.group(2).decode("ascii"),
                                                     encoding=charset, errors="replace")
        ctype = self.headers.get(b"content-type")
        self.content_type = _text(ctype) if ctype else None


def _text(value: bytes | None) -> str | None:
    # Browsers send raw UTF-8 in header parameters; anything else is kept, not refused.
    return value.decode("utf-8", errors="replace") if value is not None else None


class MultipartUpload:
    """The one file field of a `multipart/form-data` request, as a stream.

    Iterate `file_chunks()` to receive its bytes; `filename` and `content_type` are set before
    the first chunk. Raises `ApiError` 422 for a body that is not multipart, is malformed, or
    has no file field, and 413 for a body announced larger than `max_body_bytes`."""

    def __init__(self, request: Request, *, max_body_bytes: int) -> None:
        self.request = request
        self.max_body_bytes = max_body_bytes
        self.filename: str | None = None
        self.content_type: str | None = None
        self.found = False

    def _parser(self, events: list[tuple[str, object]]) -> MultipartParser:
        ctype, options = parse_options_header(self.request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise ApiError(422, "validation_error",
                           "send the document as multipart/form-data with a 'file' field")
        header: dict[str, bytes] = {"field": b"", "value": b""}

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header["field"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header["value"] += data[start:end]

        def on_header_end() -> None:
            events.append(("header", (header["field"].lower(), header["value"])))
            header["field"], header["value"] = b"", b""

        def on_part_data(data: bytes, start: int, end: int) -> None:
            events.append(("data", data[start:end]))

        return MultipartParser(boundary, callbacks={
            "on_part_begin": lambda: events.append(("begin", None)),
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: events.append(("headers", None)),
            "on_part_data": on_part_data,
            "on_part_end": lambda: events.append(("end", None)),
        })

    async def file_chunks(self) -> AsyncIterator[bytes]:
        announced = self.request.headers.get("content-length")
        if announced and announced.isdigit() and int(announced) > self.max_body_bytes:
            raise ApiError(413, "too_large",
                           f"upload exceeds the {self.max_body_bytes} byte limit "
                           f"(Content-Length {announced})")
        events: list[tuple[str, object]] = []
        parser = self._parser(events)
        part = _Part()
        in_file = done = False
        discarded = 0
        try:
            async for body in self.request.stream():
                parser.write(body)
                for kind, value in events:
                    if kind == "begin":
                        part = _Part()
                    elif kind == "header":
                        name, text = value  # type: ignore[misc]
                        part.header_size += len(name) + len(text)
                        if part.header_size > MAX_PART_HEADER_BYTES:
                            raise ApiError(422, "validation_error", "multipart headers too long")
                        part.headers[name] = text
                    elif kind == "headers":
                        part.disposition()
                        in_file = (not self.found and not done and part.name == FILE_FIELD
                                   and part.filename is not None)
                        if in_file:
                            self.found = True
                            self.filename, self.content_type = part.filename, part.content_type
                    elif kind == "data":
                        chunk: bytes = value  # type: ignore[assignment]
                        if in_file:
                            yield chunk
                        else:
                            discarded += len(chunk)
                            if discarded > FORM_FIELDS_MAX_BYTES:
                                raise ApiError(422, "validation_error",
                                               "only one 'file' field is accepted")
                    elif kind == "end" and in_file:
                        in_file, done = False, True
                events.clear()
            parser.finalize()
        except MultipartParseError as exc:
            raise ApiError(422, "validation_error", f"malformed multipart body: {exc}") from exc
        except ClientDisconnect as exc:
            raise ApiError(400, "client_disconnected", "the upload was interrupted") from exc
        if not self.found:
            raise ApiError(422, "validation_error", "the form has no 'file' field with a file")
        if not done:
            raise ApiError(422, "validation_error", "the upload ended before the file did")
