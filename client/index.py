"""Image search over a Qdrant collection: index a folder of images through the server, rank it for
a text (ITC, then optionally ITM re-ranking) or for an image.

Each image is stored as one point holding its Q query vectors (BLIP-2: 32 x 256) as a Qdrant
multivector compared with MAX_SIM: the score of a one-vector text query is then the max over the
image's query vectors of their dot product with the text's, which is exactly BLIP-2's ITC
similarity (the vectors are unit length, so the dot product is the cosine). An image query sends
its own Q vectors; MAX_SIM sums, over them, each one's best match, and `search_image` reports
that sum divided by Q.

The database is Qdrant in qdrant-client's local mode on disk by default (no server), or a Qdrant
server at a URL; the code is the same. Indexing is resumable: a point's id is derived from the
file's absolute path, and a file whose size and modification time the point already records is
skipped. Points are written only once their embedding is complete, a batch at a time, so an
interrupted run leaves a usable collection that the next run completes.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import Blip2Error, InvalidArgumentError
from .images import ImageLike

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PATH, SIZE, MTIME = "path", "size", "mtime_ns"  # payload keys of a point


def default_db() -> Path:
    """Where the local (embedded) database lives unless told: $XDG_CACHE_HOME/blip2-triton/qdrant."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "blip2-triton" / "qdrant"


class CollectionError(Blip2Error):
    """The collection cannot be used as asked (missing, or holding vectors of another size)."""

    status = "FAILED_PRECONDITION"


def point_id(path: Path) -> str:
    """A stable id for an image file: the same file always maps to the same point."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, Path(path).resolve().as_uri()))


def image_files(directory: str | Path) -> list[Path]:
    """Every image file under `directory` (by suffix), sorted, so runs visit them in one order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidArgumentError(f"{directory}: not a directory")
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class IndexReport:
    indexed: int = 0
    skipped: int = 0  # already in the collection, unchanged
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, the server's reason)


@dataclass(frozen=True)
class Hit:
    path: str
    score: float  # text query: ITC similarity; image query: mean over its query vectors of the best match
    itm_probability: float | None = None  # set for the hits re-ranked with the ITM head


class ImageIndex:
    """One Qdrant collection of images; `db` is a local directory, `url` a Qdrant server."""

    def __init__(self, collection: str, db: str | Path | None = None, url: str | None = None):
        from qdrant_client import QdrantClient

        if not collection:
            raise InvalidArgumentError("collection: give a name")
        self.collection = collection
        if url:
            self.qdrant = QdrantClient(url=url)
        else:
            path = Path(db) if db else default_db()
            path.mkdir(parents=True, exist_ok=True)
            try:
                self.qdrant = QdrantClient(path=str(path))
            except RuntimeError as e:  # qdrant-client: "already accessed by another instance"
                raise CollectionError(f"database {path}: {e}") from None

    def close(self) -> None:
        self.qdrant.close()

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing ------------------------------------------------------------------------------
    def _ensure_collection(self, dim: int) -> None:
        from qdrant_client import models

        if self.qdrant.collection_exists(self.collection):
            size = self._vector_size()
            if size != dim:
                raise CollectionError(f"collection {self.collection!r} holds {size}-dim vectors, but the server embeds "
                                  f"{dim}-dim ones (another checkpoint?); use another collection")
            return
        self.qdrant.create_collection(self.collection, vectors_config=models.VectorParams(
            size=dim, distance=models.Distance.DOT,  # unit vectors: the dot product is the cosine
            multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)))

    def _vector_size(self) -> int:
        return self.qdrant.get_collection(self.collection).config.params.vectors.size

    def _unchanged(self, files: Sequence[Path]) -> set[Path]:
        """The files whose point already records their size and modification time."""
        if not files or not self.qdrant.collection_exists(self.collection):
            return set()
        by_id = {point_id(f): f for f in files}
        found = set()
        ids = list(by_id)
        for start in range(0, len(ids), 256):
            for record in self.qdrant.retrieve(self.collection, ids=ids[start:start + 256], with_payload=True):
                f = by_id[str(record.id)]
                stat = f.stat()
                if record.payload.get(SIZE) == stat.st_size and record.payload.get(MTIME) == stat.st_mtime_ns:
                    found.add(f)
        return found

    def add(self, embedded: Sequence[tuple[Path, np.ndarray]]) -> None:
        """Write (file, [Q, D] vectors) points in one upsert."""
        from qdrant_client import models

        if not embedded:
            return
        self._ensure_collection(int(embedded[0][1].shape[-1]))
        points = []
        for path, vectors in embedded:
            stat = path.stat()
            payload = {PATH: str(path.resolve()), SIZE: stat.st_size, MTIME: stat.st_mtime_ns}
            points.append(models.PointStruct(id=point_id(path), vector=np.asarray(vectors, np.float32).tolist(),
                                             payload=payload))
        self.qdrant.upsert(self.collection, points=points, wait=True)

    def count(self) -> int:
        return self.qdrant.count(self.collection).count if self.qdrant.collection_exists(self.collection) else 0

    async def index(self, client, directory: str | Path, concurrency: int = 8,
                    progress: Callable[[int], None] | None = None) -> IndexReport:
        """Embed every image under `directory` not already indexed, `concurrency` at a time, with
        `client` (an AsyncBlip2Client); `progress(n)` after each batch of n files. A file the server
        refuses (not an image it can read) is reported and left out; the others are indexed."""
        files = image_files(directory)
        done = self._unchanged(files)
        report = IndexReport(skipped=len(done))
        if progress and done:
            progress(len(done))
        todo = [f for f in files if f not in done]
        for start in range(0, len(todo), concurrency):
            batch = todo[start:start + concurrency]
            results = await asyncio.gather(*(client.embed_image(f) for f in batch), return_exceptions=True)
            embedded = []
            for f, result in zip(batch, results):
                if isinstance(result, InvalidArgumentError):
                    report.refused.append((str(f), result.message))
                elif isinstance(result, BaseException):
                    raise result  # the server or the connection failed: stop; the next run resumes here
                else:
                    embedded.append((f, result))
            self.add(embedded)
            report.indexed += len(embedded)
            if progress:
                progress(len(batch))
        return report

    # ---- reading ------------------------------------------------------------------------------
    def nearest(self, query: np.ndarray, limit: int) -> list[Hit]:
        """The `limit` best points for a [n, D] query multivector; score: MAX_SIM divided by n."""
        if not self.qdrant.collection_exists(self.collection):
            raise CollectionError(f"no collection {self.collection!r} in this database; index images first "
                              f"(blip2-triton index IMAGE_DIR --collection {self.collection})")
        query = np.atleast_2d(np.asarray(query, np.float32))
        if query.shape[-1] != self._vector_size():
            raise CollectionError(f"collection {self.collection!r} holds {self._vector_size()}-dim vectors, but the "
                              f"server embeds {query.shape[-1]}-dim ones (another checkpoint?)")
        points = self.qdrant.query_points(self.collection, query=query.tolist(), limit=limit, with_payload=True).points
        return [Hit(p.payload[PATH], float(p.score) / len(query)) for p in points]


async def search_text(index: ImageIndex, client, text: str, top_k: int = 5, rerank: int = 0) -> list[Hit]:
    """BLIP-2's retrieval recipe: rank by ITC similarity, then re-rank the best `rerank` with the ITM
    head (by its match probability); the rest follow in ITC order."""
    _check_counts(top_k, rerank)
    hits = index.nearest((await client.embed_text(text))[None], max(top_k, rerank))
    head, tail = hits[:rerank], hits[rerank:]
    if head:
        matches = await asyncio.gather(*(client.match(h.path, text) for h in head))
        head = sorted((Hit(h.path, h.score, m.itm_probability) for h, m in zip(head, matches)),
                      key=lambda h: -h.itm_probability)
    return (head + tail)[:top_k]


async def search_image(index: ImageIndex, client, image: ImageLike, top_k: int = 5) -> list[Hit]:
    """The images nearest to `image`: its query vectors against each image's, by MAX_SIM."""
    _check_counts(top_k, 0)
    return index.nearest(await client.embed_image(image), top_k)


def _check_counts(top_k: int, rerank: int) -> None:
    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be >= 1, got {top_k}")
    if rerank < 0:
        raise InvalidArgumentError(f"rerank must be >= 0, got {rerank}")
