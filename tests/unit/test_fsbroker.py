"""The embedded broker's message files appear whole: a consumer listing the queue folder while
a message is being written never takes it half-written (celery/kombu#1551)."""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Empty

from kombu import Connection

from workers import fsbroker


def _connection(folder: Path) -> Connection:
    fsbroker.install()
    return Connection("filesystem://", transport_options={
        "data_folder_in": str(folder), "data_folder_out": str(folder),
        "control_folder": str(folder.parent / "control"), "store_processed": False})


def test_the_filesystem_alias_is_the_atomic_transport(tmp_path: Path) -> None:
    with _connection(tmp_path / "q") as conn:
        assert isinstance(conn.default_channel, fsbroker.Channel)


def test_a_consumer_never_reads_a_message_being_written(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    folder.mkdir()
    (tmp_path / "control").mkdir()
    count = 400
    body = {"pad": "x" * 200_000}  # large enough that writing it takes a while
    got: list[object] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def consume() -> None:
        with _connection(folder) as conn:
            channel = conn.default_channel
            while len(got) < count:
                try:
                    got.append(channel._get("q"))
                except Empty:
                    if done.is_set() and not any(folder.glob("*.q.msg")):
                        return  # whatever is missing was lost
                except Exception as exc:  # noqa: BLE001 - the failure under test
                    errors.append(exc)
                    return

    consumer = threading.Thread(target=consume)
    consumer.start()
    with _connection(folder) as conn:
        channel = conn.default_channel
        for i in range(count):
            channel._put("q", {**body, "i": i})
    done.set()
    consumer.join(timeout=120)
    assert errors == []
    assert sorted(m["i"] for m in got) == list(range(count))  # type: ignore[index]
    assert not list(folder.glob("*" + fsbroker.PARTIAL_SUFFIX))
