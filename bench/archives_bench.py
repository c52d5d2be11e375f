"""Archives: the project's `source.archives` against micro_diffusion's own way of preparing a dataset of
webdataset tars (CC12M's `datasets/prepare/cc12m`), the same tars served from loopback, whole command.

- **Archives**: ARCHIVES webdataset tars of PER_ARCHIVE samples each (`key.jpg`, `key.txt`, `key.json`,
  as pixparse/cc12m-wds holds them), photo-like JPEGs (`laion_operator.testbed.fakeweb`: ~100–300 KB,
  long side 800–1,600 px, and one in twenty under 256 px on its short side), generated once into
  bench/work/archives/ and served by `python -m http.server` on loopback in a process of its own.
- **micro_diffusion's approach** (`download` and `convert` below, its logic written out here): download.py fetches every
  tar whole to disk (a pool of num_proc processes, as hf_hub_download does), then convert.py splits the
  tars over num_proc processes, each extracting a tar into a temporary folder, opening every image with
  PIL, resizing it with torchvision's `Resize(512, bicubic, antialias)` when its short side is above
  512, skipping it when under 256, writing it to its own MDSWriter (`jpg` as streaming's `jpeg`: the
  file's bytes when not resized, PIL's default quality otherwise), then deleting the folder; the
  processes' indexes are merged at the end. num_proc is the machine's cores.
- **The project**: `laion-operator run part.yaml` on a local Ray, `source.archives` with the tars' URLs
  and `captions.sidecar: txt`; imageSize 512 keep_ratio, resizeOnlyIfBigger, minImageSize 256, MDS;
  like for like, encodeQuality 75 (PIL's default) and skipReencode (an image not resized keeps its
  bytes, as streaming's encoder keeps a JPEG file's, but takes img2dataset's own resizer); and its fast
  path: reducedDecode (a JPEG decoded at 1/2, 1/4 … of its size where the target allows, bench/README.md
  § 2) without skipReencode (an image not resized is re-encoded at quality 75: more work, not less).
- **Measured**, each side ROUNDS times in turns: the whole command's wall time, CPU and peak memory (its
  process tree), and its peak disk use, sampled every 50 ms: scratch (micro_diffusion: the downloaded
  tars and the extracted folders; the project: its TMPDIR, where a zip would be spooled) apart from
  the MDS output. Both sides must write the same samples (count and captions).
- **Goals**: the project's whole command ≥ 1.5× micro_diffusion's (medians), each project side; its
  peak scratch disk at most one archive per task (the largest archive × the cores).

    python -m bench.archives_bench download URLS_FILE DATADIR NUM_PROC   # micro_diffusion's download.py
    python -m bench.archives_bench convert DATADIR NUM_PROC              # and its convert.py
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

from tests.support.loopback import free_port

from . import common

ARCHIVES = 8
PER_ARCHIVE = 200
ROUNDS = 3
SMALL_SHARE = 0.05  # images under minImageSize, which both sides drop
IMAGE_SIZE, MIN_IMAGE_SIZE = 512, 256
SIDES = {
    "micro_diffusion": "micro_diffusion's download.py + convert.py",
    "project": "project, source.archives, local Ray",
    "project-fast": "project, reducedDecode and no skipReencode (its fast path)",
}


# --- the archives --------------------------------------------------------------------------------


def make_archives(folder: Path, archives: int = ARCHIVES, per_archive: int = PER_ARCHIVE, seed: int = 12) -> list[Path]:
    """The tars, made once (a marker file names what they hold)."""
    from laion_operator.testbed.fakeweb import Spec, encode

    marker = folder / "made.json"
    wanted = {"archives": archives, "per_archive": per_archive, "seed": seed}
    paths = [folder / f"cc12m-train-{i:04d}.tar" for i in range(archives)]
    if marker.exists() and json.loads(marker.read_text()) == wanted and all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for a, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for i in range(per_archive):
                key = f"{a:04d}{i:05d}"
                if rng.random() < SMALL_SHARE:
                    w, h = int(rng.integers(180, 250)), int(rng.integers(250, 400))
                else:
                    long = int(rng.integers(800, 1600))
                    w, h = long, int(long / rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
                    if rng.random() < 0.35:
                        w, h = h, w
                caption = f"a photo number {key} of something {int(rng.integers(1 << 30))}"
                files = {
                    "jpg": encode(Spec(f"arch{key}", w, h, "jpg")),
                    "txt": caption.encode(),
                    "json": json.dumps({"key": key, "caption": caption, "width": w, "height": h}).encode(),
                }
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        print(f"[archives] made {path.name} ({path.stat().st_size / 2**20:.0f} MB)", file=sys.stderr, flush=True)
    marker.write_text(json.dumps(wanted))
    return paths


# --- micro_diffusion's side ------------------------------------------------------------------------


def _download(url: str, datadir: str) -> None:
    """One tar fetched whole to disk, as hf_hub_download does (to a partial file, renamed when done)."""
    import urllib.request

    target = os.path.join(datadir, url.rsplit("/", 1)[-1])
    with urllib.request.urlopen(url) as response, open(target + ".incomplete", "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)
    os.replace(target + ".incomplete", target)


def _process_index() -> int:
    from multiprocessing import current_process

    return current_process()._identity[0] - 1


def _read_tar(path: str, path_out: str):
    """Extract the tar, yield each (PIL image, caption) by its .txt, then remove the folder."""
    import glob

    from PIL import Image

    os.makedirs(path_out, exist_ok=False)
    with tarfile.open(path, "r") as tar:
        tar.extractall(path_out, filter="data")
    for txt in sorted(glob.glob(os.path.join(path_out, "*txt"))):
        try:
            with open(txt) as f:
                caption = f.read()
            yield Image.open(txt.replace(".txt", ".jpg")), caption
        except Exception as err:  # noqa: BLE001 - as the script: a bad sample is printed and skipped
            print(err)
    shutil.rmtree(path_out)
    shutil.rmtree(os.path.dirname(path_out))


def _write_tars(tars: list[str], mds_dir: str) -> None:
    from PIL import UnidentifiedImageError
    from streaming.base import MDSWriter
    from torchvision import transforms

    columns = {"width": "int32", "height": "int32", "jpg": "jpeg", "caption": "str"}
    save_dir = os.path.join(mds_dir, str(_process_index()))
    os.makedirs(save_dir, exist_ok=True)
    writer = MDSWriter(out=save_dir, columns=columns, compression=None, size_limit=256 * (2**20), max_workers=64)
    downsize = transforms.Resize(IMAGE_SIZE, antialias=True, interpolation=transforms.InterpolationMode.BICUBIC)
    temp_dir = os.path.join(save_dir, f"temp/wds_{_process_index()}")
    for tar in tars:
        for img, cap in _read_tar(tar, temp_dir):
            w, h = img.size
            try:
                if min(w, h) > IMAGE_SIZE:
                    img = downsize(img)
                if min(w, h) < MIN_IMAGE_SIZE:
                    continue
            except (UnidentifiedImageError, OSError) as err:
                print(f"Error {err}")
            writer.write({"jpg": img, "caption": cap, "width": w, "height": h})
    writer.finish()


def download(urls_file: str, datadir: str, num_proc: int) -> None:
    """download.py: every tar whole into <datadir>/wds."""
    from multiprocessing import Pool

    wds = os.path.join(datadir, "wds")
    os.makedirs(wds, exist_ok=True)
    with Pool(processes=num_proc) as pool:
        pool.starmap(_download, [(url, wds) for url in Path(urls_file).read_text().split()])


def convert(datadir: str, num_proc: int) -> None:
    """convert.py: the tars of <datadir>/wds into <datadir>/mds, one writer a process, indexes merged."""
    import glob
    from multiprocessing import Pool

    from streaming.base.util import merge_index

    started = time.perf_counter()
    wds, mds = os.path.join(datadir, "wds"), os.path.join(datadir, "mds")
    tars = glob.glob(os.path.join(wds, "*tar"))
    with Pool(processes=num_proc) as pool:
        pool.starmap(_write_tars, [(list(part), mds) for part in np.array_split(tars, num_proc)])
    merge_index([os.path.join(mds, str(i), "index.json") for i in range(num_proc)], out=mds, keep_local=True)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def baseline_cmd(urls_file: Path, datadir: Path, num_proc: int) -> list[str]:
    """get_cc12m_dataset.sh's steps A and B: two programs, one after the other."""
    run = f"{shlex.quote(common.PYTHON)} -m bench.archives_bench"
    where, n = shlex.quote(str(datadir)), num_proc
    return ["sh", "-c", f"{run} download {shlex.quote(str(urls_file))} {where} {n} && {run} convert {where} {n}"]


# --- the project's side ----------------------------------------------------------------------------


def project_cmd(urls: list[str], out: Path, fast: bool = False) -> list[str]:
    import yaml

    spec = {
        "partId": "archives",
        "source": {"archives": {"urls": urls, "captions": {"sidecar": "txt"}}},
        "output": {"uri": str(out)},
        "download": {
            "imageSize": IMAGE_SIZE,
            "resizeMode": "keep_ratio",
            "resizeOnlyIfBigger": True,
            "minImageSize": MIN_IMAGE_SIZE,
            "outputFormat": "mds",
            "encodeQuality": 75,
            # skipReencode takes img2dataset's own resizer (the project's faster one re-encodes every image)
            "skipReencode": not fast,
            "allowedNetworks": ["127.0.0.0/8"],
            "reducedDecode": fast,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return [str(Path(common.PYTHON).parent / "laion-operator"), "run", str(path)]


# --- measuring -------------------------------------------------------------------------------------


def _bytes(root: Path, output) -> tuple[int, int]:
    """(scratch, output) bytes under `root`; `output(path)` tells an output file."""
    scratch = written = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                size = os.stat(path).st_size
            except OSError:  # removed while walked
                continue
            if output(path):
                written += size
            else:
                scratch += size
    return scratch, written


class DiskPeaks:
    """Peak scratch and output bytes under some folders while a command runs, sampled every 50 ms."""

    def __init__(self, roots: list[Path], output):
        self.roots, self.output = roots, output
        self.scratch = self.written = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            sums = [_bytes(root, self.output) for root in self.roots]
            self.scratch = max(self.scratch, sum(s for s, _ in sums))
            self.written = max(self.written, sum(w for _, w in sums))
            self._done.wait(0.05)

    def __enter__(self) -> DiskPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def captions(mds: Path) -> list[str]:
    """Every sample's caption of an MDS dataset (its root index.json), read as a trainer reads it."""
    from streaming import LocalDataset

    dataset = LocalDataset(local=str(mds))
    return sorted(dataset[i]["caption"] for i in range(len(dataset)))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}–{max(values):.1f})"


def bench(rounds: int = ROUNDS, archives: int = ARCHIVES, per_archive: int = PER_ARCHIVE) -> tuple[str, list[str]]:
    work = common.WORK / "archives"
    tars = make_archives(work / "served", archives, per_archive)
    port = free_port()
    server = subprocess.Popen(
        [common.PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(work / "served")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=common.env(),
    )
    urls = [f"http://127.0.0.1:{port}/{t.name}" for t in tars]
    (work / "urls.txt").write_text("\n".join(urls))
    cores = os.cpu_count() or 2
    runs: dict[str, list[tuple[common.Run, DiskPeaks, float]]] = {side: [] for side in SIDES}
    written: dict[str, list[str]] = {}
    try:
        _wait_for(urls[0])
        for attempt in range(rounds):
            for side in SIDES:
                side_dir, scratch = work / side, work / f"{side}-tmp"
                for d in (side_dir, scratch):
                    shutil.rmtree(d, ignore_errors=True)
                    d.mkdir(parents=True)
                if side.startswith("project"):
                    out, roots = side_dir / "mds", [side_dir, scratch]
                    cmd = project_cmd(urls, out, fast=side == "project-fast")
                    env = common.env(TMPDIR=str(scratch), RAY_TMPDIR="/tmp")  # Ray's session logs are no data
                else:
                    cmd = baseline_cmd(work / "urls.txt", side_dir, cores)
                    roots, out, env = [side_dir, scratch], side_dir / "mds", common.env(TMPDIR=str(scratch))
                # micro_diffusion extracts into <mds>/<process>/temp/: scratch, though inside its output
                with DiskPeaks(roots, lambda p, out=str(out): p.startswith(out) and "/temp/" not in p) as disk:
                    r = common.run(cmd, cwd=common.ROOT, env=env)
                runs[side].append((r, disk, stage_seconds(r, out)))
                written[side] = captions(out)
                print(
                    f"[archives] {side:<16} round {attempt + 1}/{rounds}: {r.seconds:6.1f} s "
                    f"(stage {runs[side][-1][2]:5.1f} s), CPU {r.cpu:6.1f} s, "
                    f"memory {common.mb(r.peak_rss)}, scratch disk {common.mb(disk.scratch)}, "
                    f"{len(written[side])} samples, load {common.load()}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    return report(runs, written, tars, cores)


def _wait_for(url: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stage_seconds(run: common.Run, out: Path) -> float:
    """The work without start-up: the project's first shard start to last shard end (its stats files);
    micro_diffusion's convert.py (the time it prints; its download is loopback-fast here)."""
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    if stats:
        return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return common.last_json(run.stdout)["seconds"]


def report(runs: dict, written: dict[str, list[str]], tars: list[Path], cores: int) -> tuple[str, list[str]]:
    same = all(written[side] == written["micro_diffusion"] for side in SIDES)
    largest = max(t.stat().st_size for t in tars)
    seconds = {side: [r.seconds for r, _, _ in rs] for side, rs in runs.items()}
    stages = {side: [st for _, _, st in rs] for side, rs in runs.items()}
    base = statistics.median(seconds["micro_diffusion"])
    scratch = {side: max(d.scratch for _, d, _ in rs) for side, rs in runs.items()}
    rows = [
        [
            SIDES[side],
            _spread(seconds[side]),
            _spread(stages[side]),
            f"{base / statistics.median(seconds[side]):.2f}×",
            f"{statistics.median(r.cpu for r, _, _ in rs):.1f} s",
            common.mb(int(statistics.median(r.peak_rss for r, _, _ in rs))),
            common.mb(scratch[side]),
            common.mb(max(d.written for _, d, _ in rs)),
            f"{len(written[side]):,}",
        ]
        for side, rs in runs.items()
    ]
    total = sum(t.stat().st_size for t in tars)
    header = ["side", "whole command, median (min–max)", "stage (min–max)", "vs micro_diffusion", "CPU"]
    header += ["peak memory", "peak scratch disk", "output", "samples"]
    per_round = {
        side: ", ".join(f"{b / p:.2f}×" for b, p in zip(seconds["micro_diffusion"], seconds[side], strict=True))
        for side in SIDES
        if side != "micro_diffusion"
    }
    text = "\n".join(
        [
            f"{len(tars)} webdataset tars of {PER_ARCHIVE} samples ({total / 2**20:.0f} MB in all, the largest "
            f"{largest / 2**20:.0f} MB) on loopback; {cores} cores; each side {len(seconds['project'])} times in "
            "turns. Stage: the project's first shard start to last shard end; micro_diffusion's convert.py.",
            "",
            common.table(header, rows),
            "",
            "Per round, micro_diffusion's whole command over the project's: "
            + "; ".join(f"{side} {ratios}" for side, ratios in per_round.items())
            + f". Samples {'identical' if same else 'DIFFERENT'} on every side (count and captions).",
        ]
    )
    goals = [
        f"archives: whole command {base / statistics.median(seconds[side]):.2f}× micro_diffusion's download + "
        f"extract + convert ({SIDES[side]}; rounds {per_round[side]}; goal ≥ 1.5×): "
        f"{common.goal(base / statistics.median(seconds[side]) >= 1.5 and same)}"
        for side in per_round
    ]
    goals.append(
        f"archives: peak scratch disk {common.mb(max(scratch[s] for s in per_round))} (micro_diffusion's "
        f"{common.mb(scratch['micro_diffusion'])}); goal ≤ one archive a task, {common.mb(largest * cores)}: "
        f"{common.goal(max(scratch[s] for s in per_round) <= largest * cores)}"
    )
    return text, goals


def main(argv: list[str]) -> None:
    if argv[:1] == ["download"]:
        download(argv[1], argv[2], int(argv[3]))
    elif argv[:1] == ["convert"]:
        convert(argv[1], int(argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
