"""A parse worker's main process loads the parser before its pool forks (workers.signals), so a
pool child that replaces a recycled one inherits it instead of loading it again; other workers
do not load it. Each case runs in a fresh interpreter: this test process has the parser loaded
already."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.stack import REPO

_PROBE = textwrap.dedent("""
    import sys

    from celery.signals import worker_init

    import workers.signals  # noqa: F401 - connects the handlers
    from pipelines import parsing
    from workers.app import app

    app.amqp.queues.select(sys.argv[1].split(","))
    class Worker:  # what the handler reads of celery's WorkController
        app = app

    worker_init.send(sender=Worker())
    print("warmed" if parsing._warmed else "cold",
          "pdf-loaded" if "unstructured.partition.pdf" in sys.modules else "pdf-absent")
""")


@pytest.mark.parametrize(("queues", "expected"), [
    ("parse", "warmed pdf-loaded"),
    ("embed", "cold pdf-absent"),
    ("answer,maintenance", "cold pdf-absent"),
])
def test_only_a_parse_worker_loads_the_parser_before_forking(queues: str, expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, queues], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={"DO_NOT_TRACK": "1", "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == expected
