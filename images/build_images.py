"""Builds the project's container images from the working tree (run as scripts/build-images; see
images/README.md).

    scripts/build-images                                  # laion-operator/operator:<version>, …/ray-worker:<version>
    scripts/build-images --testbed --extras pipeline      # + pause; OCI archives and <cache>/images.json

Each image is built from a build context of its own, staged from the working tree with exactly the
files its Dockerfile uses, so that an image's content hash covers all that goes into it: the
Dockerfile, those files, the build arguments and the base image's own hash. In --testbed mode that
hash is the image's tag (`<version>-dev.<12 hex>`) and names its archive in the cache: an image whose
archive exists is not built again.

With --local-bases (buildah's default: no registry needed) the base images are made from Debian's
packages: a Python base by mmdebstrap, and a Ray base from images/ray-base/Dockerfile on it.
Standard library only: it runs with any Python 3.11 (scripts/build-images prefers .venv's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Part of every hash: bump it when the way an image is built or exported changes.
RECIPE_VERSION = "1"
HASH_HEX = 12
KEEP_ARCHIVES = 3  # per image, the newest; older ones are pruned
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# The images' names: without --testbed as images/Makefile names them (and the chart's values.yaml);
# with --testbed as a node's containerd names them (`ctr images import --base-name <repository>`).
REPOSITORIES = {"operator": "laion-operator/operator", "ray-worker": "laion-operator/ray-worker"}
TESTBED_REPOSITORIES = {
    "operator": "docker.io/laion-operator/operator",
    "ray-worker": "docker.io/laion-operator/ray-worker",
    "pause": "docker.io/laion-operator/pause",
}
LOCAL_BASES = {"python-base": "localhost/laion-operator/python-base", "ray-base": "localhost/laion-operator/ray-base"}

# The Debian Python base: what the operator's and the Ray base's Dockerfiles need of a Python image
# (python and `python -m venv` of Python 3.11, CA certificates, groupadd/useradd).
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRRORS = (
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE} main",
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main",
)
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
DEBIAN_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
DEBIAN_CONFIG = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
)

# The files of the working tree an image's build context holds (its Dockerfile's COPY sources; the
# root .dockerignore lets the same through to a plain `docker build`). Folders are taken whole, less
# caches; setuptools' operator/build and operator/*.egg-info lie outside them.
PACKAGE_CONTEXT = ("requirements.lock", "operator/pyproject.toml", "operator/laion_operator")
EXCLUDED_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
PAUSE_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Werror")


def log(message: str) -> None:
    print(f"build-images: {message}", file=sys.stderr, flush=True)


def project_version(root: Path = ROOT) -> str:
    match = re.search(r'^version = "(.*)"', (root / "operator" / "pyproject.toml").read_text(), re.M)
    if not match:
        raise SystemExit("build-images: operator/pyproject.toml has no version")
    return match.group(1)


def locked_version(package: str, root: Path = ROOT) -> str:
    for line in (root / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise SystemExit(f"build-images: {package} is not pinned in requirements.lock")


def dockerfile_arg_default(dockerfile: str, name: str, root: Path = ROOT) -> str:
    match = re.search(rf"^ARG {name}=(\S+)\s*$", (root / dockerfile).read_text(), re.M)
    if not match:
        raise SystemExit(f"build-images: {dockerfile} has no ARG {name}=…")
    return match.group(1)


def context_files(paths: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The files under `paths` (relative to root), sorted, less caches and build outputs."""
    files = []
    for rel in paths:
        path = root / rel
        if path.is_file():
            files.append(rel)
            continue
        if not path.is_dir():
            raise SystemExit(f"build-images: {rel} is missing from {root}")
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.endswith(EXCLUDED_SUFFIXES))
            for name in names:
                if not name.endswith(EXCLUDED_SUFFIXES):
                    files.append(str((Path(folder) / name).relative_to(root)))
    return sorted(set(files))


class Hasher:
    """SHA-256 over length-prefixed fields, so that no two different inputs feed the same bytes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def field(self, *parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            self._hash.update(len(data).to_bytes(8, "big"))
            self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclasses.dataclass
class Image:
    """One image to build: its recipe and what it is built on."""

    role: str
    dockerfile: str | None  # relative to the repository root; None: the Debian Python base (mmdebstrap)
    context: tuple[str, ...] = ()
    args: dict[str, str] = dataclasses.field(default_factory=dict)
    base: Image | None = None  # a local base this image is built on (built first when missing)
    base_arg: str | None = None  # the build argument naming the base
    extra: tuple[str, ...] = ()  # further inputs of the hash (the Debian recipe, the compiler)
    name: str = ""  # repository:tag, set by plan()
    digest: str = ""  # the content hash, set by plan()
    root: Path = ROOT

    def content_hash(self) -> str:
        h = Hasher()
        h.field("recipe", RECIPE_VERSION, self.role)
        if self.dockerfile:
            h.field("Dockerfile", (self.root / self.dockerfile).read_bytes())
        for rel in context_files(self.context, self.root):
            path = self.root / rel
            h.field("file", rel, "x" if os.access(path, os.X_OK) else "-", path.read_bytes())
        for key in sorted(self.args):
            if key != self.base_arg or self.base is None:  # a local base counts by its hash, below
                h.field("arg", key, self.args[key])
        for item in self.extra:
            h.field("extra", item)
        if self.base is not None:
            h.field("base", self.base.content_hash())
        return h.hexdigest()


def pause_compiler() -> str:
    """The compiler's version, an input of the pause image ("" without gcc: its build then fails)."""
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.splitlines()[0]


def plan(
    roles: list[str],
    *,
    testbed: bool,
    local_bases: bool,
    extras: str,
    python_image: str | None = None,
    ray_image: str | None = None,
    root: Path = ROOT,
) -> dict[str, Image]:
    """The images of `roles`, named and hashed, with the local bases they need as their `base`."""
    version = project_version(root)
    python_base = ray_base = None
    if local_bases:
        recipe = (
            DEBIAN_SUITE,
            *DEBIAN_MIRRORS,
            *DEBIAN_PACKAGES,
            *DEBIAN_DPKG_OPTIONS,
            *DEBIAN_CONFIG,
        )
        python_base = Image("python-base", None, extra=recipe, root=root)
        ray_base = Image(
            "ray-base",
            "images/ray-base/Dockerfile",
            context=("requirements.lock",),
            base=python_base,
            base_arg="PYTHON_IMAGE",
            root=root,
        )
    images: dict[str, Image] = {}
    for role in roles:
        if role == "operator":
            image = Image("operator", "images/operator/Dockerfile", PACKAGE_CONTEXT, base_arg="PYTHON_IMAGE", root=root)
            image.base = python_base
            if python_base is None:
                image.args["PYTHON_IMAGE"] = python_image or dockerfile_arg_default(
                    image.dockerfile, "PYTHON_IMAGE", root
                )
        elif role == "ray-worker":
            image = Image(
                "ray-worker", "images/ray-worker/Dockerfile", PACKAGE_CONTEXT, base_arg="RAY_IMAGE", root=root
            )
            image.args["EXTRAS"] = extras
            image.base = ray_base
            if ray_base is None:
                image.args["RAY_IMAGE"] = ray_image or dockerfile_arg_default(image.dockerfile, "RAY_IMAGE", root)
        elif role == "pause":
            image = Image(
                "pause",
                "images/pause/Dockerfile",
                ("images/pause/pause.c",),
                extra=(" ".join(PAUSE_CFLAGS), pause_compiler()),
                root=root,
            )
        else:
            raise SystemExit(f"build-images: no image {role!r} (operator, ray-worker, pause)")
        images[role] = image
    for image in _with_bases(images.values()):
        image.digest = image.content_hash()
        short = image.digest[:HASH_HEX]
        if image.role == "python-base":
            image.name = f"{LOCAL_BASES['python-base']}:{DEBIAN_SUITE}-{short}"
        elif image.role == "ray-base":
            image.name = f"{LOCAL_BASES['ray-base']}:{locked_version('ray', root)}-{short}"
        elif testbed:
            image.name = f"{TESTBED_REPOSITORIES[image.role]}:{version}-dev.{short}"
        else:
            image.name = f"{REPOSITORIES[image.role]}:{version}"
    # The local bases' names go into their images' build arguments, after the hashes (which take the
    # base's own hash instead).
    for image in _with_bases(images.values()):
        if image.base is not None and image.base_arg:
            image.args[image.base_arg] = image.base.name
    return images


def _with_bases(images) -> list[Image]:
    seen: dict[int, Image] = {}

    def visit(image: Image) -> None:
        if image.base is not None:
            visit(image.base)
        seen.setdefault(id(image), image)

    for image in images:
        visit(image)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------
# Engines


class Engine:
    name = ""

    def __init__(self, logs: Path, verbose: bool) -> None:
        self.logs = logs
        self.verbose = verbose

    def run(self, argv: list[str], logfile: Path, **kwargs) -> subprocess.CompletedProcess:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("a") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            if self.verbose:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    sys.stderr.write(line)
                result = subprocess.CompletedProcess(argv, proc.wait())
            else:
                result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        if result.returncode != 0:
            tail = logfile.read_text(errors="replace").splitlines()[-30:]
            sys.stderr.write("\n".join(tail) + "\n")
            raise SystemExit(f"build-images: `{argv[0]} {argv[1]}` failed ({result.returncode}); log: {logfile}")
        return result

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def build(self, image: Image, context: Path, local_base: bool, logfile: Path) -> None:
        raise NotImplementedError

    def import_rootfs(self, rootfs: Path, name: str, config: tuple[str, ...], logfile: Path) -> None:
        raise NotImplementedError

    def export(self, name: str, archive: Path, logfile: Path) -> None:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError


class Buildah(Engine):
    name = "buildah"

    def __init__(
        self, logs: Path, verbose: bool, isolation: str | None, ca_bundle: str | None, compression: str
    ) -> None:
        super().__init__(logs, verbose)
        self.isolation = isolation
        self.ca_bundle = ca_bundle
        self.compression = compression

    def exists(self, name: str) -> bool:
        return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0

    def build(self, image: Image, context: Path, local_base: bool, logfile: Path) -> None:
        assert image.dockerfile
        argv = ["buildah", "bud", "--layers", "--network", "host", "--pull=never" if local_base else "--pull=false"]
        if self.isolation:
            argv += ["--isolation", self.isolation]
        if self.ca_bundle and image.role != "pause":
            # The machine's CA bundle, for a network whose proxy has a CA of its own (Debian's pip and
            # apt read it; a base's own bundle would not know that CA).
            argv += ["-v", f"{self.ca_bundle}:{CA_BUNDLE}:ro"]
        for key, value in sorted(image.args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        argv += ["-f", str(context / image.dockerfile), "-t", image.name, str(context)]
        self.run(argv, logfile)

    def import_rootfs(self, rootfs: Path, name: str, config: tuple[str, ...], logfile: Path) -> None:
        container = subprocess.run(
            ["buildah", "from", "scratch"], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            self.run(["buildah", "add", container, str(rootfs), "/"], logfile)
            env = [arg for item in config for arg in ("--env", item)]
            self.run(["buildah", "config", *env, "--cmd", "python3", container], logfile)
            self.run(["buildah", "commit", "--quiet", container, name], logfile)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)

    def export(self, name: str, archive: Path, logfile: Path) -> None:
        # The archive's index names the image in full (org.opencontainers.image.ref.name), so that
        # `ctr images import --base-name <repository>` names it exactly so (a full name passes
        # containerd's ref translator unchanged). Layers are compressed as they are written (buildah
        # 1.28's --disable-compression does not reach oci-archive): zstd took 6 s for the operator's
        # 350 MB where gzip took 16 to 80 s on 2 busy cores; containerd unpacks either.
        argv = ["buildah", "push", "--quiet", "--compression-format", self.compression]
        self.run([*argv, name, f"oci-archive:{archive}:{name}"], logfile)

    def size(self, name: str) -> int:
        listing = subprocess.run(["buildah", "images", "--json", name], capture_output=True, text=True)
        with contextlib.suppress(ValueError, IndexError, KeyError, TypeError, AttributeError):
            return human_bytes(json.loads(listing.stdout)[0]["size"])
        return -1

    def remove(self, name: str) -> None:
        subprocess.run(["buildah", "rmi", name], capture_output=True)


class Docker(Engine):
    name = "docker"

    def exists(self, name: str) -> bool:
        return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0

    def build(self, image: Image, context: Path, local_base: bool, logfile: Path) -> None:
        assert image.dockerfile
        argv = ["docker", "build", "--progress", "plain"]
        for key, value in sorted(image.args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        argv += ["-f", str(context / image.dockerfile), "-t", image.name, str(context)]
        self.run(argv, logfile, env={**os.environ, "DOCKER_BUILDKIT": "1"})

    def import_rootfs(self, rootfs: Path, name: str, config: tuple[str, ...], logfile: Path) -> None:
        changes = [arg for item in config for arg in ("--change", f"ENV {item}")]
        self.run(["docker", "import", *changes, "--change", 'CMD ["python3"]', str(rootfs), name], logfile)

    def export(self, name: str, archive: Path, logfile: Path) -> None:
        # Docker 25 and later write an OCI layout whose index names the image (io.containerd.image.name).
        self.run(["docker", "save", "-o", str(archive), name], logfile)

    def size(self, name: str) -> int:
        out = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True
        )
        return int(out.stdout.strip() or -1)

    def remove(self, name: str) -> None:
        subprocess.run(["docker", "image", "rm", name], capture_output=True)


def human_bytes(size: str | int) -> int:
    """buildah's sizes: "691 KB", "1.55 GB" (decimal units), or a number."""
    if isinstance(size, int):
        return size
    number, _, unit = size.strip().partition(" ")
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit.upper()]
    return round(float(number) * scale)


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ----------------------------------------------------------------------------------------------------
# Building


def stage_context(image: Image, into: Path) -> Path:
    """A build context holding the image's Dockerfile and context files (copied, with normalised
    modes so that a checkout's umask does not change the image), and the pause program compiled."""
    context = into / "context"
    for rel in [image.dockerfile, *context_files(image.context, image.root)] if image.dockerfile else []:
        source, target = image.root / rel, context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)
    if image.role == "pause":
        source = context / "images" / "pause" / "pause.c"
        subprocess.run(["gcc", *PAUSE_CFLAGS, "-o", str(source.with_suffix("")), str(source)], check=True)
    return context


def build_debian_python_base(engine: Engine, image: Image, work: Path, logfile: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("build-images: --local-bases needs mmdebstrap (apt-get install mmdebstrap)")
    rootfs = work / "rootfs.tar"
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--format=tar",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        *(f"--dpkgopt={option}" for option in DEBIAN_DPKG_OPTIONS),
        DEBIAN_SUITE,
        str(rootfs),
        *DEBIAN_MIRRORS,
    ]
    engine.run(argv, logfile)
    engine.import_rootfs(rootfs, image.name, DEBIAN_CONFIG, logfile)


def ensure(engine: Engine, image: Image, work: Path, logs: Path, force: bool) -> None:
    """Builds the image (and first its missing local bases) unless the engine has it."""
    if image.base is not None:
        ensure(engine, image.base, work, logs, force=False)
    if not force and engine.exists(image.name):
        return
    logfile = logs / f"{image.role}-{image.digest[:HASH_HEX]}.log"
    log(f"building {image.name} (log: {logfile})")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"{image.role}-", dir=work) as tmp:
        if image.dockerfile is None:
            build_debian_python_base(engine, image, Path(tmp), logfile)
        else:
            engine.build(image, stage_context(image, Path(tmp)), image.base is not None, logfile)
    log(f"built {image.name} in {time.monotonic() - start:.1f} s")


def docker_reference(name: str) -> str:
    """A Docker name in full, as containerd normalises it (laion-operator/pause:x is
    docker.io/laion-operator/pause:x, pause:x docker.io/library/pause:x)."""
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    return name if "." in first or ":" in first or first == "localhost" else f"docker.io/{name}"


def verify_archive(archive: Path, name: str) -> None:
    """The archive names the image `name` as containerd reads it: an OCI layout's index.json
    (buildah; Docker 25 and later), or a Docker archive's manifest.json (older Docker)."""

    def read(tar: tarfile.TarFile, member: str):
        file = tar.extractfile(member)
        assert file is not None, member
        return json.load(file)

    names: list[str | None] = []
    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
        if "index.json" in members:
            for manifest in read(tar, "index.json").get("manifests", []):
                annotations = manifest.get("annotations", {})
                names += [
                    annotations.get(key) for key in ("org.opencontainers.image.ref.name", "io.containerd.image.name")
                ]
        if "manifest.json" in members:
            for manifest in read(tar, "manifest.json"):
                names += [docker_reference(tag) for tag in manifest.get("RepoTags") or []]
    if name not in names and name.rsplit(":", 1)[1] not in names:
        raise SystemExit(f"build-images: {archive} does not name {name}: it names {names}")


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prune(engine: Engine, folder: Path, keep: int) -> None:
    archives = sorted(folder.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[keep:]:
        meta = old.with_suffix(".json")
        with contextlib.suppress(OSError, ValueError, KeyError):
            engine.remove(json.loads(meta.read_text())["image"])
        old.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        log(f"pruned {old}")


def testbed_entry(engine: Engine, image: Image, cache: Path, work: Path, logs: Path, rebuild: bool) -> dict:
    folder = cache / image.role
    tag = image.name.rsplit(":", 1)[1]
    archive, meta = folder / f"{tag}.tar", folder / f"{tag}.json"
    repository = image.name.rsplit(":", 1)[0]
    entry: dict = {"repository": repository, "tag": tag, "image": image.name, "archive": str(archive)}
    if "EXTRAS" in image.args:
        entry["extras"] = image.args["EXTRAS"]
    if not rebuild and archive.is_file() and meta.is_file():
        recorded = json.loads(meta.read_text())
        os.utime(archive)  # the newest, for pruning
        log(f"{image.name}: cached ({archive})")
        return {
            **entry,
            "size_bytes": archive.stat().st_size,
            "image_bytes": recorded.get("image_bytes"),
            "build_seconds": 0.0,
            "cached": True,
            "built_seconds": recorded.get("build_seconds"),
        }
    if image.base is not None:
        ensure(engine, image.base, work, logs, force=False)  # a base's time is not its image's
    start = time.monotonic()
    ensure(engine, image, work, logs, force=rebuild)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{tag}.tar.partial"
    partial.unlink(missing_ok=True)
    logfile = logs / f"{image.role}-{image.digest[:HASH_HEX]}.log"
    engine.export(image.name, partial, logfile)
    verify_archive(partial, image.name)
    partial.replace(archive)
    took = round(time.monotonic() - start, 1)
    image_bytes = engine.size(image.name)
    meta.write_text(json.dumps({"image": image.name, "build_seconds": took, "image_bytes": image_bytes}) + "\n")
    log(f"{image.name}: {archive} ({archive.stat().st_size / 1e6:.0f} MB) in {took:.1f} s")
    prune(engine, folder, KEEP_ARCHIVES)
    return {
        **entry,
        "size_bytes": archive.stat().st_size,
        "image_bytes": image_bytes,
        "build_seconds": took,
        "cached": False,
        "built_seconds": took,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/build-images",
        description="Build the project's container images from the working tree (images/README.md).",
    )
    parser.add_argument("roles", nargs="*", metavar="IMAGE", help="operator, ray-worker, pause (default: all)")
    parser.add_argument("--engine", choices=("docker", "buildah"), help="default: docker if `docker info` answers")
    parser.add_argument(
        "--local-bases",
        action=argparse.BooleanOptionalAction,
        help="build the base images from Debian's packages (default: with buildah)",
    )
    parser.add_argument("--extras", default="pipeline,formats", help="the ray-worker's extras (default: %(default)s)")
    parser.add_argument("--testbed", action="store_true", help="also the pause image; OCI archives and images.json")
    parser.add_argument("--python-image", help="the operator's PYTHON_IMAGE without --local-bases")
    parser.add_argument("--ray-image", help="the ray-worker's RAY_IMAGE without --local-bases")
    parser.add_argument("--rebuild", action="store_true", help="build again what the cache has (not the bases)")
    parser.add_argument("--isolation", help="buildah's --isolation (default: buildah's own)")
    parser.add_argument(
        "--ca-bundle",
        default=CA_BUNDLE if Path(CA_BUNDLE).is_file() else "",
        help="buildah: this machine's CA bundle, mounted over the base's in RUN steps ('' for none)",
    )
    parser.add_argument(
        "--compression",
        choices=("zstd", "gzip"),
        default="zstd",
        help="buildah: the archives' layer compression (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the engine's output, not only its log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine_name = args.engine or ("docker" if docker_answers() else "buildah")
    if shutil.which(engine_name) is None:
        raise SystemExit(f"build-images: {engine_name} is not installed")
    local_bases = engine_name == "buildah" if args.local_bases is None else args.local_bases
    roles = args.roles or (["operator", "ray-worker", "pause"] if args.testbed else ["operator", "ray-worker"])
    cache = Path(os.environ.get("LAION_IMAGES_CACHE") or Path.home() / ".cache" / "laion-operator" / "images")
    logs, work = cache / "logs", cache / "tmp"
    engine: Engine = (
        Buildah(logs, args.verbose, args.isolation, args.ca_bundle or None, args.compression)
        if engine_name == "buildah"
        else Docker(logs, args.verbose)
    )
    images = plan(
        roles,
        testbed=args.testbed,
        local_bases=local_bases,
        extras=args.extras,
        python_image=args.python_image,
        ray_image=args.ray_image,
    )
    log(f"{engine_name}, {'local Debian bases' if local_bases else 'bases from a registry'}: {', '.join(roles)}")
    with locked(cache):
        work.mkdir(parents=True, exist_ok=True)
        if not args.testbed:
            for image in images.values():
                ensure(engine, image, work, logs, force=True)
                print(image.name)
            return 0
        entries = {
            role: testbed_entry(engine, image, cache, work, logs, args.rebuild) for role, image in images.items()
        }
        index = cache / "images.json"
        partial = index.with_suffix(".json.partial")
        partial.write_text(json.dumps(entries, indent=2) + "\n")
        partial.replace(index)
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
