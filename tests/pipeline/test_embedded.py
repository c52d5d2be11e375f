"""Parquet with the images inside (`source.embedded`): TextCaps' Hugging Face layout (the `{bytes, path}`
image struct, a list of reference captions) and a plain bytes column, listed by row groups, written as
MDS, resumed shard by shard."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_operator.errors import InputError
from laion_operator.pipeline.driver import run_part
from laion_operator.pipeline.sources import SOURCES
from laion_operator.pipeline.sources.embedded import row_ranges
from laion_operator.spec import PartSpec
from tests.pipeline.test_convert import jpeg
from tests.support import outputs
from tests.test_cli import cli, write_part

EMBEDDED = SOURCES["embedded"]
BROKEN = 6  # the row whose bytes are not an image


def textcaps(path, rows: int = 10, row_group: int = 4) -> dict[str, bytes]:
    """TextCaps as the Hub's parquet holds it; returns each row's first reference caption → image."""
    images = [jpeg(i) if i != BROKEN else b"\xff\xd8 not a jpeg" for i in range(rows)]
    table = pa.table(
        {
            "image_id": [f"id{i:03d}" for i in range(rows)],
            "image": pa.array(
                [{"bytes": data, "path": f"{i:03d}.jpg"} for i, data in enumerate(images)],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "image_width": pa.array([40] * rows, pa.int32()),
            "image_classes": [["Poster"] for _ in range(rows)],
            "reference_strs": [[f"ref {i} a", f"ref {i} b"] for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return {f"ref {i} a": data for i, data in enumerate(images)}


def part(urls: list[str], output, per_shard: int = 5, output_opts: dict | None = None, **embedded) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "tc",
            "source": {"embedded": {"urls": urls, **embedded}},
            "output": {"uri": str(output), **(output_opts or {})},
            "filter": {"samplesPerShard": per_shard},
            "download": {"outputFormat": "mds", "resizeMode": "no", "skipReencode": True, "shardRetries": 0},
        }
    )


def test_row_groups_gather_into_shards_and_large_ones_are_cut():
    assert row_ranges([4, 4, 2], 5) == [(0, 8), (8, 10)]
    assert row_ranges([5, 5], 5) == [(0, 5), (5, 10)]
    assert row_ranges([2, 12, 1], 5) == [(0, 2), (2, 7), (7, 12), (12, 14), (14, 15)]
    assert row_ranges([], 5) == []


def test_textcaps_rows_read_with_their_first_caption_and_scalar_metadata(tmp_path):
    images = textcaps(tmp_path / "train-00000-of-00001.parquet")
    spec = part([str(tmp_path / "train-00000-of-00001.parquet")], tmp_path / "out")
    entries = EMBEDDED.list_inputs(spec)
    assert [(e["start"], e["end"], e["image"], e["caption"]) for e in entries] == [
        (0, 8, "image", "reference_strs"),
        (8, 10, "image", "reference_strs"),
    ]
    samples = [s for e in entries for s in EMBEDDED.read_input(spec, e)]
    assert [sample.caption for sample, _ in samples] == list(images)
    assert [data for _, data in samples] == list(images.values())
    first = samples[0][0]
    assert first.key == "000" and first.file.endswith("train-00000-of-00001.parquet row 0")
    assert first.meta == {"image_id": "id000", "image_width": 40}  # the list column is no scalar


def test_bad_inputs_name_the_file_the_column_and_the_row(tmp_path):
    good = tmp_path / "good.parquet"
    textcaps(good)
    with pytest.raises(
        InputError, match=r"good\.parquet: no column 'caption_str' \(spec\.source\.embedded\.captionColumn\)"
    ):
        EMBEDDED.list_inputs(part([str(good)], tmp_path / "o", captionColumn="caption_str"))

    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "text": ["c"]}), strings)
    with pytest.raises(InputError, match=r"strings\.parquet: column 'image' holds string, not an image's bytes"):
        EMBEDDED.list_inputs(part([str(strings)], tmp_path / "o"))

    no_columns = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"blob": [b"x"], "text": ["c"]}), no_columns)
    with pytest.raises(InputError, match=r"plain\.parquet: none of the columns \['image', .*imageColumn"):
        EMBEDDED.list_inputs(part([str(no_columns)], tmp_path / "o"))

    holes = tmp_path / "holes.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": jpeg(1), "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"}],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "text": ["a", "b"],
            }
        ),
        holes,
    )
    spec = part([str(holes)], tmp_path / "o")
    (entry,) = EMBEDDED.list_inputs(spec)
    with pytest.raises(InputError, match=r"holes\.parquet: row 1: no image in column 'image' \(path b\.jpg\)"):
        list(EMBEDDED.read_input(spec, entry))

    with pytest.raises(InputError, match=r"missing\.parquet: no such metadata file"):
        EMBEDDED.list_inputs(part([str(tmp_path / "missing.parquet")], tmp_path / "o"))


def test_textcaps_from_s3_to_mds_counts_the_undecodable_row(ray_driver, s3, tmp_path):
    images = textcaps(tmp_path / "textcaps.parquet")
    bucket = s3.create_bucket("textcaps")
    s3.client().upload_file(str(tmp_path / "textcaps.parquet"), bucket, "data/train-00000-of-00001.parquet")
    where = {"endpoint": s3.endpoint, "region": "us-east-1", "pathStyle": True}
    spec = part([f"s3://{bucket}/data/train-00000-of-00001.parquet"], f"s3://{bucket}/mds", output_opts=where)
    summary = run_part(spec)
    assert summary["shards"] == {"total": 2, "done": 2, "failed": 0}
    assert summary["images"]["ok"] == 9 and summary["images"]["failedByReason"] == {"decode": 1}
    assert summary["verified"]["ok"]

    written = outputs.images(spec.output, "mds")
    assert sorted(s.caption for s in written) == sorted(c for i, c in enumerate(images) if i != BROKEN)
    for sample in written:
        assert sample.image == images[sample.caption]  # resizeMode no + skipReencode: the bytes kept
    rows = outputs.metadata(spec.output)
    (failed,) = [row for row in rows if row["status"] != "success"]
    assert failed["failure_reason"] == "decode"
    assert "train-00000-of-00001.parquet row 6" in failed["error_message"]
    # The row's own scalar columns reach every sample's metadata, beside the leading ones.
    assert sorted(row["image_id"] for row in rows) == [f"id{i:03d}" for i in range(len(rows))]
    assert all(row["image_width"] == 40 for row in rows)


def test_a_bytes_column_part_resumes_with_each_row_once(ray_driver, tmp_path):
    rows = 11
    source = tmp_path / "bytes.parquet"
    pq.write_table(
        pa.table({"jpg": [jpeg(i) for i in range(rows)], "text": [f"caption {i}" for i in range(rows)]}),
        source,
        row_group_size=3,
    )
    out = tmp_path / "mds"
    spec = part([str(source)], out, per_shard=3)
    first = run_part(spec)
    assert first["shards"]["total"] == 4 and first["images"]["ok"] == rows
    kept = {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 1, 3)}
    (out / "00002_stats.json").unlink()  # shard 2 as an interrupted attempt leaves it
    second = run_part(spec)
    assert {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 1, 3)} == kept
    written = outputs.images(out, "mds")
    assert sorted(s.caption for s in written) == sorted(f"caption {i}" for i in range(rows))
    assert len({s.key for s in written}) == rows
    assert second["images"] == first["images"] and second["verified"]["ok"]


def test_dry_run_lists_the_row_ranges_as_shards(tmp_path):
    textcaps(tmp_path / "a.parquet")
    textcaps(tmp_path / "b.parquet", rows=3)
    part = write_part(
        tmp_path,
        source={"embedded": {"urls": [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]}},
        filter={"samplesPerShard": 5},
        download={"outputFormat": "mds"},
    )
    done = cli("run", str(part), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "2 parquet files with the images inside in 3 shards" in done.stdout and "as mds" in done.stdout
    assert not (tmp_path / "out").exists()


def test_a_rows_own_scores_and_language_meet_the_filter(tmp_path):
    """LAION-style columns inside the parquet (punsafe, AESTHETIC_SCORE, LANGUAGE) judged by spec.filter
    as a URL list's would be: a failing row is counted as `filtered`, its message naming the column."""
    from laion_operator.pipeline.convert import convert_shard, plan
    from laion_operator.storage import Store

    source = tmp_path / "scored.parquet"
    punsafe = [0.1, 0.9, 0.2, 0.1, 0.3, None]
    aesthetic = [6.0, 6.5, 4.0, 7.0, 6.2, 6.1]
    language = ["en", "en", "en", "de", "en", "en"]
    pq.write_table(
        pa.table(
            {
                "jpg": [jpeg(i) for i in range(6)],
                "caption": [f"c{i}" for i in range(6)],
                "punsafe": punsafe,
                "AESTHETIC_SCORE": aesthetic,
                "LANGUAGE": language,
            }
        ),
        source,
    )
    spec = PartSpec.from_dict(
        {
            **part([str(source)], tmp_path / "out", per_shard=6).to_dict(),
            "filter": {"samplesPerShard": 6, "maxPunsafe": 0.5, "minAesthetic": 5.0, "languages": ["en"]},
        }
    )
    plan(spec, Store(spec.output))
    stats = convert_shard(spec, 0)
    # row 1 unsafe, row 2 below the score, row 3 not English; row 5 has no punsafe: not judged on it
    assert (stats.successes, stats.failed_by_reason) == (3, {"filtered": 3})
    rows = {row["caption"]: row for row in outputs.metadata(spec.output)}
    assert "punsafe 0.9 fails filter.maxPunsafe 0.5" in rows["c1"]["error_message"]
    assert "AESTHETIC_SCORE 4.0 fails filter.minAesthetic 5.0" in rows["c2"]["error_message"]
    assert "LANGUAGE 'de' is not one of filter.languages" in rows["c3"]["error_message"]
    assert rows["c5"]["status"] == "success" and rows["c5"]["punsafe"] is None


def test_a_pattern_with_first_and_last_lists_the_files_as_urls_do(tmp_path):
    for n in range(3):
        textcaps(tmp_path / f"train-{n:05d}-of-00003.parquet", rows=4)
    pattern = {"pattern": str(tmp_path / "train-{part}-of-00003.parquet"), "first": 1, "last": 2, "digits": 5}
    urls = [str(tmp_path / f"train-{n:05d}-of-00003.parquet") for n in (1, 2)]
    by_urls = part(urls, tmp_path / "u", imageColumn="image")
    by_pattern = PartSpec.from_dict({**by_urls.to_dict(), "source": {"embedded": {**pattern, "imageColumn": "image"}}})
    assert EMBEDDED.list_inputs(by_pattern) == EMBEDDED.list_inputs(by_urls)
    assert [e["file"] for e in EMBEDDED.list_inputs(by_pattern)] == urls
    assert EMBEDDED.describe(by_pattern) == "2 parquet files with the images inside"
    with pytest.raises(InputError, match=r"spec.source.embedded: set either urls or pattern"):
        PartSpec.from_dict({**by_urls.to_dict(), "source": {"embedded": {"urls": urls, **pattern}}})
    with pytest.raises(InputError, match=r"spec.source.embedded: a pattern needs \{part\} in it, and first and last"):
        PartSpec.from_dict({**by_urls.to_dict(), "source": {"embedded": {"pattern": "x.parquet", "first": 0}}})
