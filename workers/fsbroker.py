"""The embedded broker: kombu's filesystem transport, with message files that appear whole.

kombu's `filesystem` transport creates a message file and then writes it. A consumer that lists
the folder in between moves the empty file away, fails to decode it (`JSONDecodeError`, an
"Unrecoverable error" that stops the worker) and the message is gone (celery/kombu#1551). Under
load, with many small jobs, that happens within minutes. Here a message is written under a name
no consumer takes (`….msg.partial`) and renamed into place once complete: a rename within one
directory is atomic, so a consumer sees the whole message or nothing.

`install()` points the `filesystem://` alias at this transport; `workers.app` calls it before
any connection is made, in every process that publishes or consumes.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

PARTIAL_SUFFIX = ".partial"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Put `payload` onto `queue`: written aside, then renamed to the name consumers read
        (kombu's own naming: the time in ms first, so a folder listing sorts FIFO)."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PARTIAL_SUFFIX
        try:
            with open(partial, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def install() -> None:
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
