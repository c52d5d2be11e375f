"""The CLI's promises: clear errors naming the field, file or output; the dry-run plan; a clean terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from laion_operator.pipeline.filter import plan
from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata

CLI = str(Path(sys.executable).parent / "laion-operator")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def write_part(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "part.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "partId": "1",
                "source": {"urls": [str(tmp_path / "m.parquet")]},
                "output": {"uri": str(tmp_path / "out")},
                **spec,
            }
        )
    )
    return path


def test_invalid_spec_names_each_field_and_the_allowed_values(tmp_path):
    part = write_part(
        tmp_path,
        filter={"minWidth": "wide", "sampleFraction": 0},
        download={"outputFormat": "zip", "encodeFormat": "png", "encodeQuality": 50},
        extra=1,
    )
    result = cli("run", str(part))
    assert result.returncode == 2
    err = result.stderr
    assert str(part) in err
    assert "spec.filter.minWidth: 'wide' is not of type 'integer'" in err
    assert "spec.filter.sampleFraction" in err
    assert (
        "spec.download.outputFormat: 'zip' is not one of the allowed values: webdataset, files, parquet, tfrecord"
        in err
    )
    assert "'extra' was unexpected" in err and "known fields:" in err


def test_png_quality_is_a_compression_level(tmp_path):
    spec = {"partId": "1", "source": {"urls": ["m.parquet"]}, "output": {"uri": "o"}}
    assert PartSpec.from_dict({**spec, "download": {"encodeFormat": "png"}}).download.encode_quality == 9
    result = cli("run", str(write_part(tmp_path, download={"encodeFormat": "png", "encodeQuality": 50})))
    assert (
        result.returncode == 2
        and "spec.download: encodeQuality must be at most 9 when encodeFormat is png" in result.stderr
    )


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    result = cli("run", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "absent.yaml: no such file" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("partId: [unclosed\n")
    result = cli("run", str(bad))
    assert result.returncode == 2 and "bad.yaml: not valid YAML" in result.stderr


def test_unwritable_output_fails_before_any_download(tmp_path):
    write_metadata(tmp_path / "m.parquet", 50, "http://127.0.0.1:9")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    part = write_part(tmp_path)
    doc = yaml.safe_load(part.read_text())
    doc["output"]["uri"] = str(blocker / "out")
    part.write_text(yaml.safe_dump(doc))
    result = cli("run", str(part))
    assert result.returncode == 2
    assert f"output {blocker / 'out'} is not writable" in result.stderr
    assert not (blocker.parent / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    write_metadata(tmp_path / "m.parquet", 3000, "http://127.0.0.1:9")
    part = write_part(tmp_path, filter={"minWidth": 512, "samplesPerShard": 100})
    result = cli("run", str(part), "--dry-run")
    assert result.returncode == 0, result.stderr
    expected = plan(PartSpec.from_dict(yaml.safe_load(part.read_text())))
    assert f"{expected.rows_read:,} rows read, {expected.rows_kept:,} kept in {expected.shards} shards" in result.stdout
    assert f"{expected.dropped_by['minWidth']:,} dropped by minWidth" in result.stdout
    assert " GB if every image downloads" in result.stdout
    assert not (tmp_path / "out").exists()


def test_crd_command_prints_the_shipped_crd():
    result = cli("crd")
    root = Path(__file__).resolve().parents[1]
    assert yaml.safe_load(result.stdout) == yaml.safe_load((root / "crds" / "laionpart.yaml").read_text())
    result = cli("crd", "--kind", "LaionDataset")
    assert yaml.safe_load(result.stdout) == yaml.safe_load((root / "crds" / "laiondataset.yaml").read_text())


def test_a_local_run_speaks_first_and_only_of_the_part(tmp_path, image_server):
    """A user's terminal: Ray's notices stay out of it, and no line of zeros comes before any row.
    The private cluster it starts has no API server (nothing serves it) and is gone when it exits."""
    write_metadata(tmp_path / "m.parquet", 30, image_server.base_url, seed=5, failure_mix={"ok": 1.0})
    part = write_part(tmp_path, filter={"samplesPerShard": 50}, download={"imageSize": 32, "parallelism": 1})
    # Ray's sockets live under its temp folder: a short one of this test's own (a path over 107 bytes
    # cannot be a socket's).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": str(ray_tmp)}
        run = subprocess.run([CLI, "run", str(part)], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert lines[0].startswith("part 1: 1 metadata file -> "), lines[:5]
        assert not [line for line in lines if "Token authentication" in line or "[filter] 0 rows" in line]
        assert any(line.startswith("  images ") for line in lines)
        logs = [p.name for p in ray_tmp.glob("ray/session_*/logs/*")]
        assert any(name.startswith("raylet.") for name in logs), logs  # Ray ran from this folder
        assert not [name for name in logs if name.startswith("dashboard.")], logs
        left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
        assert not left, f"Ray processes outlived the command: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_latents_over_an_mds_folder_needs_only_output_and_latents_and_names_its_columns(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "theirs"), columns={"image": "bytes", "text": "str"}) as writer:
        writer.write({"image": b"\xff\xd8", "text": "a cat"})
    spec = tmp_path / "latents.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "output": {"uri": str(tmp_path / "out")},
                "latents": {"vae": "v", "textEncoder": "t", "resolutions": [256, 512]},
            }
        )
    )
    wrong = cli("latents", str(spec), "--mds", str(tmp_path / "theirs"))
    assert wrong.returncode == 2
    assert "no column 'jpg' (its columns: image, text); name it with --image-column" in wrong.stderr, wrong.stderr
    missing = cli("latents", str(spec), "--mds", str(tmp_path / "nowhere"), "--image-column", "image")
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}/index.json: missing" in missing.stderr


def test_latents_command_names_what_is_missing(tmp_path):
    without = cli("latents", str(write_part(tmp_path)))
    assert without.returncode == 2
    assert "spec.latents: required field is missing" in without.stderr
    part = write_part(tmp_path, latents={"vae": "v", "textEncoder": "t", "latentMode": "median"})
    bad = cli("latents", str(part))
    assert (
        bad.returncode == 2
        and "spec.latents.latentMode: 'median' is not one of the allowed values: mean, sample" in bad.stderr
    )
    part = write_part(tmp_path, latents={"vae": "v", "textEncoder": "t"})
    empty = cli("latents", str(part))
    assert empty.returncode == 2
    assert f"output {tmp_path / 'out'} holds no finished shard" in empty.stderr
