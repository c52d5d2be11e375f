"""Archives in the layouts micro_diffusion's datasets ship in, built in memory, and a loopback server
of them that answers range requests, expires links and drops connections on request.

Each layout builder returns the files it makes (path under the server's root → bytes) and the
samples the archives hold: {(archive name, member): caption}, so a test knows what a part must write.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

EXPIRED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><Expires>2023-04-01T00:00:00Z</Expires></Error>"
)


def image(seed: int, size: tuple[int, int] = (48, 32), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar of `members` in order; mode "w:gz" for a .tgz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zipped(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as out:
        for name, data in members:
            out.writestr(name, data)
    return buf.getvalue()


def journeydb(archives: int = 2, per: int = 3) -> tuple[dict[str, bytes], dict[tuple[str, str], str]]:
    """JourneyDB: imgs/NNN.tgz of NNN/<hash>.jpg, and data/train/train_anno_realease_repath.jsonl.tgz
    whose lines are {"img_path": "./NNN/<hash>.jpg", "prompt": ...}."""
    files, samples, lines = {}, {}, []
    for a in range(archives):
        members = []
        for i in range(per):
            member = f"{a:03d}/{(a * 1000 + i) * 2654435761 % 2**32:08x}.jpg"
            members.append((member, image(a * 100 + i)))
            prompt = f"a journey prompt {a}-{i} --v 5"
            samples[(f"{a:03d}.tgz", member)] = prompt
            lines.append(json.dumps({"img_path": f"./{member}", "prompt": prompt, "aspect_ratio": "1:1"}))
        files[f"imgs/{a:03d}.tgz"] = tar(members, "w:gz")
    anno = ("\n".join(lines) + "\n").encode()
    files["data/train/train_anno_realease_repath.jsonl.tgz"] = tar([("train_anno_realease_repath.jsonl", anno)], "w:gz")
    return files, samples


def diffusiondb(archives: int = 2, per: int = 3) -> tuple[dict[str, bytes], dict[tuple[str, str], str]]:
    """DiffusionDB: images/part-NNNNNN.zip of <uuid>.webp and part-NNNNNN.json {"<file>.webp": {"p": ...}}."""
    files, samples = {}, {}
    for a in range(1, archives + 1):
        name, members, table = f"part-{a:06d}.zip", [], {}
        for i in range(per):
            member = f"{a:08x}-{i:04x}-4{i:03x}-8000-{a * 7919 + i:012x}.webp"
            members.append((member, image(a * 50 + i, fmt="WEBP")))
            table[member] = {"p": f"diffusion prompt {a}-{i}", "se": a * 10 + i, "c": 7.0, "st": 50, "sa": "k_lms"}
            samples[(name, member)] = table[member]["p"]
        members.append((f"part-{a:06d}.json", json.dumps(table).encode()))
        files[f"images/{name}"] = zipped(members)
    return files, samples


def sa1b(archives: int = 3, per: int = 2) -> tuple[dict[str, bytes], dict[tuple[str, str], str], str]:
    """SA-1B: sa_NNNNNN.tar of sa_N.jpg + sa_N.json (masks, no caption), captioned from other archives:
    captions/sa_NNNNNN.tar, one caption file sa_N.txt per image of the image archive of that name;
    captions/SA1B_caption.tar.gz, every sa_N.txt in one archive (under a folder, as it unpacks); and a
    .tgz of a JSONL naming images by base name. Returns the files, the samples and the link file's
    text for `base` (its URLs are filled in with `links(base)`)."""
    files, samples, lines, names, every = {}, {}, [], [], []
    n = 1
    for a in range(archives):
        name, members, texts = f"sa_{a:06d}.tar", [], []
        for _ in range(per):
            members.append((f"sa_{n}.jpg", image(n)))
            members.append((f"sa_{n}.json", json.dumps({"image": {"image_id": n}, "annotations": []}).encode()))
            caption = f"segment anything image {n}"
            samples[(name, f"sa_{n}.jpg")] = caption
            lines.append(json.dumps({"image": f"sa_{n}.jpg", "caption": caption}))
            texts.append((f"sa_{n}.txt", f"{caption}\n".encode()))
            n += 1
        files[f"sa1b/{name}"] = tar(members)
        files[f"captions/{name}"] = tar(texts)
        every += [(f"SA1B_caption/{member}", text) for member, text in texts]
        names.append(name)
    files["captions/sa1b_captions.tgz"] = tar([("sa1b_captions.jsonl", ("\n".join(lines) + "\n").encode())], "w:gz")
    files["captions/SA1B_caption.tar.gz"] = tar(every, "w:gz")
    return files, samples, "\n".join(names)


def diffusiondb_metadata(files: dict[str, bytes], unsafe: set[str]) -> bytes:
    """DiffusionDB's metadata.parquet for the images of `diffusiondb`'s zips: a row per image with its
    prompt and the columns the release has (seed, step, cfg, sampler, width, height, user_name,
    image_nsfw, prompt_nsfw), the images named in `unsafe` scored 0.9 on image_nsfw, the rest 0.05."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path, data in sorted(files.items()):
        if not path.endswith(".zip"):
            continue
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            table = json.loads(z.read(path.rsplit("/", 1)[1].replace(".zip", ".json")))
        part_id = int(path.rsplit("-", 1)[1].split(".")[0])
        for member, values in table.items():
            rows.append(
                {
                    "image_name": member,
                    "prompt": values["p"],
                    "part_id": part_id,
                    "seed": values["se"],
                    "step": values["st"],
                    "cfg": values["c"],
                    "sampler": values["sa"],
                    "width": 48,
                    "height": 32,
                    "user_name": "c4a3f",
                    "image_nsfw": 0.9 if member in unsafe else 0.05,
                    "prompt_nsfw": 0.01,
                }
            )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def links(names: str, base: str, signature: str = "sig1") -> str:
    """SA-1B's link file: a header, then file_name<TAB>cdn_link (signed) a line."""
    rows = ["file_name\tcdn_link"] + [f"{n}\t{base}/sa1b/{n}?Signature={signature}&Expires=1" for n in names.split()]
    return "\n".join(rows) + "\n"


def coco(count: int = 4) -> tuple[dict[str, bytes], dict[tuple[str, str], str]]:
    """COCO: val2014.zip of val2014/COCO_val2014_<12 digits>.jpg, annotations/captions_val2014.json with
    images[] {id, file_name} and annotations[] {image_id, id, caption} (five captions an image: the first wins)."""
    members, images, notes, samples = [], [], [], {}
    for i in range(count):
        image_id = 42 + i * 1000
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        members.append((f"val2014/{file_name}", image(image_id)))
        images.append({"id": image_id, "file_name": file_name, "width": 48, "height": 32})
        for c in range(5):
            notes.append({"image_id": image_id, "id": image_id * 10 + c, "caption": f"coco caption {i}.{c}"})
        samples[("val2014.zip", f"val2014/{file_name}")] = f"coco caption {i}.0"
    notes.reverse()
    notes.sort(key=lambda n: n["id"] % 10 != 0)  # the first caption of each image first, others after
    anno = {"info": {}, "images": images, "annotations": notes}
    files = {
        "coco/val2014.zip": zipped(members, zipfile.ZIP_DEFLATED),
        "coco/annotations/captions_val2014.json": json.dumps(anno).encode(),
    }
    return files, samples


def cc12m(archives: int = 2, per: int = 3) -> tuple[dict[str, bytes], dict[tuple[str, str], str]]:
    """CC12M as pixparse/cc12m-wds: cc12m-train-NNNN.tar of key.jpg / key.txt / key.json."""
    files, samples = {}, {}
    for a in range(archives):
        name, members = f"cc12m-train-{a:04d}.tar", []
        for i in range(per):
            key = f"{a:04d}{i:05d}"
            caption = f"conceptual caption {a}-{i}"
            members += [
                (f"{key}.jpg", image(a * 30 + i)),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg", "caption": caption}).encode()),
            ]
            samples[(name, f"{key}.jpg")] = caption
        files[f"cc12m/{name}"] = tar(members)
    return files, samples


class ArchiveServer:
    """Serves `files` over loopback HTTP/1.1 with Range support. `expired`: paths answering 403 with S3's
    "Request has expired"; `cut`: paths whose next answer sends half its body and drops the connection;
    `ranges`: whether Range is honoured; `auth`: paths answering 401 without that Authorization header;
    `redirects`: paths answering 302 to another URL; `slow`: paths sent at so many bytes a second.
    `requests` logs (path, Range header) of every request, `authorizations` (path, Authorization
    header), `agents` its User-Agent."""

    def __init__(self, files: dict[str, bytes], host: str = "127.0.0.1"):
        self.files = dict(files)
        self.expired: set[str] = set()
        self.cut: set[str] = set()
        self.ranges = True
        self.auth: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.authorizations: list[tuple[str, str | None]] = []
        self.requests: list[tuple[str, str | None]] = []
        self.agents: list[str | None] = []  # each request's User-Agent
        self.slow: dict[str, float] = {}  # paths whose body is sent at this many bytes a second
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0].lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                server.agents.append(self.headers.get("User-Agent"))
                server.authorizations.append((path, self.headers.get("Authorization")))
                if path in server.auth and self.headers.get("Authorization") != server.auth[path]:
                    return self._answer(401, b"Invalid credentials in Authorization header")
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.expired:
                    return self._answer(403, EXPIRED_BODY, "application/xml")
                data = server.files.get(path)
                if data is None:
                    return self._answer(404, b"not found")
                start = 0
                asked = self.headers.get("Range")
                if asked and server.ranges and asked.startswith("bytes="):
                    start = int(asked[6:].split("-", 1)[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if path in server.cut:
                    server.cut.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if path in server.slow:
                    step = max(int(server.slow[path] / 20), 1)  # 20 writes a second
                    for at in range(0, len(body), step):
                        self.wfile.write(body[at : at + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

            def _answer(self, status, body, kind="text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fetched(self, prefix: str) -> list[str]:
        """The paths under `prefix` requested, in order."""
        return [path for path, _ in self.requests if path.startswith(prefix)]
