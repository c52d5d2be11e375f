"""A FAISS index of a part's embeddings (embeddings.index, `laion-operator index OUTPUT`), the guide's
"index the resulting embeddings" step, and the search over it (`laion-operator search`, `search()`).

autofaiss builds each index (the images' and the captions') from the embeddings folder as
clip-retrieval's index step does, choosing its kind within the memory budget given; it reads the
files in name order and adds their rows in order, so an index id is a row of the metadata files
read in that order, which `ids.parquet` lists (id, key, shard, url, caption):

    embeddings/index/image.index    embeddings/index/text.index    FAISS, inner product (cosine)
    embeddings/index/ids.parquet    embeddings/index/index.json    the map, and the model and kinds

The index is written to a local folder first and copied to the output, as the latents' MDS files are.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract import EMBEDDINGS_DIR, EMBEDDINGS_INDEX
from ..errors import InputError
from ..storage import Store

TOWERS = {"image": "img_emb", "text": "text_emb"}


@dataclass
class Hit:
    """One search result."""

    id: int
    key: str
    similarity: float
    caption: str | None
    url: str | None
    shard: int


def _metadata_files(store: Store) -> list[str]:
    folder = f"{EMBEDDINGS_DIR}/metadata"
    if not store.exists(folder):
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(folder), detail=False) if p.endswith(".parquet"))


def build(store: Store, model: str, memory: str = "4G") -> dict:
    """Build the image and text indexes of the output's embeddings within `memory` (autofaiss's
    max_index_memory_usage, e.g. "4G"); returns index.json's content."""
    import faiss
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    from autofaiss import build_index

    files = _metadata_files(store)
    if not files:
        raise InputError(f"output {store.uri} holds no embeddings ({EMBEDDINGS_DIR}/metadata/…): embed it first")
    ids = pa.concat_tables(
        [
            pq.read_table(io.BytesIO(store.fs.cat(store.path(EMBEDDINGS_DIR, "metadata", f))))
            .select(["key", "shard", "url", "caption"])
            .cast(
                pa.schema([("key", pa.string()), ("shard", pa.int32()), ("url", pa.string()), ("caption", pa.string())])
            )
            for f in files
        ]
    )
    ids = ids.add_column(0, "id", pa.array(np.arange(len(ids), dtype=np.int64)))
    info: dict = {"model": model, "count": len(ids), "memory": memory, "built": time.time(), "indexes": {}}
    with tempfile.TemporaryDirectory(prefix="laion-index-") as local:
        for tower, folder in TOWERS.items():
            # autofaiss's save_on_disk writes its infos with numpy floats json cannot write: the index
            # is saved here instead
            index, found = build_index(
                embeddings=store.url(EMBEDDINGS_DIR, folder),
                save_on_disk=False,
                index_infos_path=None,
                max_index_memory_usage=memory,
                # what autofaiss may use while it trains and adds: the node's, not the index's budget
                current_memory_available=f"{max(psutil.virtual_memory().available >> 20, 1)}M",
                metric_type="ip",
                file_format="npy",
                verbose=30,
            )
            if index is None:  # autofaiss logs why: no index kind fits the budget, or too little memory
                raise InputError(f"spec.embeddings.indexMemory {memory!r}: autofaiss built no {tower} index within it")
            if index.ntotal != len(ids):
                raise RuntimeError(f"autofaiss indexed {getattr(index, 'ntotal', 0)} of {len(ids)} {tower} embeddings")
            faiss.write_index(index, str(Path(local) / f"{tower}.index"))
            info["indexes"][tower] = {k: v.item() if hasattr(v, "item") else v for k, v in (found or {}).items()}
        buf = io.BytesIO()
        pq.write_table(ids, buf)
        (Path(local) / "ids.parquet").write_bytes(buf.getvalue())
        (Path(local) / "index.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        store.fs.makedirs(store.path(EMBEDDINGS_INDEX), exist_ok=True)
        for name in ("image.index", "text.index", "ids.parquet", "index.json"):  # index.json last: it is done
            store.fs.put_file(str(Path(local) / name), store.path(EMBEDDINGS_INDEX, name))
    return info


def search(
    store: Store,
    text: str | None = None,
    image: bytes | None = None,
    k: int = 10,
    against: str = "image",
    clip=None,
) -> list[Hit]:
    """The `k` samples nearest a caption or an image (the guide's subset selection by query), among
    the output's images (`against="image"`) or its captions ("text"); the query is embedded by the
    model the index was built with (or `clip`, a models.Clip)."""
    import faiss
    import pyarrow.parquet as pq

    from .encoding import preprocess, to_uint8
    from .models import load_clip

    info = store.read_json(EMBEDDINGS_INDEX, "index.json")
    if info is None:
        raise InputError(f"output {store.uri} has no index ({EMBEDDINGS_INDEX}/index.json): run laion-operator index")
    if (text is None) == (image is None):
        raise InputError("search: give a text or an image, not both")
    if clip is None:
        from ..spec import PartSpec

        spec = PartSpec.from_dict(
            {
                "partId": "search",
                "source": {"urls": ["-"]},
                "output": {"uri": store.uri},
                "embeddings": {"model": info["model"]},
            }
        )
        assert spec.embeddings is not None
        clip = load_clip(spec.embeddings)
    if text is not None:
        query = clip.texts([text])
    else:
        try:
            query = clip.images(to_uint8([preprocess(image or b"", clip.size)]))
        except OSError as err:
            raise InputError(f"search --image: not an image the stage can decode: {err}") from None
    vector = query.float().cpu().numpy()
    vector /= np.linalg.norm(vector, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="laion-search-") as local:
        path = str(Path(local) / "q.index")
        store.fs.get_file(store.path(EMBEDDINGS_INDEX, f"{against}.index"), path)
        index = faiss.read_index(path)
    scores, found = index.search(vector.astype(np.float32), min(k, index.ntotal))
    ids = pq.read_table(io.BytesIO(store.fs.cat(store.path(EMBEDDINGS_INDEX, "ids.parquet")))).to_pylist()
    return [
        Hit(
            id=int(i),
            key=ids[i]["key"],
            similarity=float(s),
            caption=ids[i]["caption"],
            url=ids[i]["url"],
            shard=ids[i]["shard"],
        )
        for s, i in zip(scores[0], found[0])
        if i >= 0
    ]
