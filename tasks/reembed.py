"""The re-embed sweep: move the vectors of ready documents to the configured embedding model.

After the configured model changes (`SLUICE_EMBEDDING_MODEL_PATH`, or new weights in the
package), new ingests are embedded with it at once, and this sweep re-embeds the chunks stored
by the previous model in the background, a document at a time: read its chunks → encode
(outside any transaction) → write every vector of the document in one transaction, checking
that the document is still ready and its chunks unchanged. Each run does up to
`reembed_chunks_per_run` chunks, so beat spreads a large corpus over many short runs and the
maintenance queue never waits long behind it. Nothing is held between runs: an interrupted run
(killed worker, time limit, lost lease) leaves every document wholly on one version, and the
next run goes on from whatever is still outdated.

What searches see meanwhile: a document's chunks are never on two models at once, so a
document is always scored consistently. Across documents the index is mixed until the sweep
ends: queries are encoded with the configured (new) model, so documents not yet swept are
compared with vectors of the old model. Their full-text ranking (half of the default hybrid
search) is unaffected; their dense scores are only as meaningful as the two models are
compatible (a re-packaged or fine-tuned copy of the same model: close; an unrelated model of
the same dimension: noise). `count_outdated` (the `remaining` of each run) says how long that
lasts. Dimensions other than the schema's (384) cannot be stored at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from models import reembed
from sluice.db import read_scope, session_scope

if TYPE_CHECKING:
    from pipelines.embedding import Embedder

log = logging.getLogger(__name__)


def reembed_outdated(
    *, embedder: Embedder, max_chunks: int, keep: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """One sweep run: re-embed whole documents until `max_chunks` chunks are done or none is
    outdated. `keep` is called before each write (it renews the run's lease, raising when it
    was lost). Loads the model only when there is work."""
    model, version = embedder.model_name, embedder.model_version
    documents = chunks = skipped = 0
    tried: list[str] = []
    while chunks < max_chunks:
        with read_scope() as session:
            document_id = reembed.next_outdated_document(session, version=version,
                                                         exclude=tried)
        if document_id is None:
            break
        tried.append(document_id)
        with read_scope() as session:
            texts = reembed.document_chunks(session, document_id=document_id)
        vectors = embedder.encode([c.text for c in texts]) if texts else []
        keep()
        with session_scope() as session:
            switched = reembed.switch_document(
                session, document_id=document_id, chunk_ids=[c.id for c in texts],
                vectors=list(vectors), model=model, version=version)
        if switched:
            documents += 1
            chunks += len(texts)
        else:
            skipped += 1  # changed while it was encoded: the next run looks again
    with read_scope() as session:
        remaining = reembed.count_outdated(session, version=version)
    result = {"version": version, "documents": documents, "chunks": chunks,
              "skipped": skipped, "remaining": remaining}
    if documents or skipped or remaining:
        log.info("re-embed sweep to %s: %d documents (%d chunks) switched, %d skipped, "
                 "%d chunks still on another version", version, documents, chunks, skipped,
                 remaining)
    return result
