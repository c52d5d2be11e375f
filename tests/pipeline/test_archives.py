"""Archives as a source: each of micro_diffusion's archive layouts served over loopback HTTP and written
as a part's shards, each image once with its caption; and every way an archive goes wrong (cut short,
a member that is not an image, an annotation without its fields, too large, an expired link, a bomb,
a member climbing out with ../) failing with the archive and member named, nothing written lost."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections import Counter

import pyarrow as pa
import pytest

from laion_operator import contract, credentials
from laion_operator.errors import InputError
from laion_operator.pipeline import formats
from laion_operator.pipeline.convert import convert_shard, plan
from laion_operator.pipeline.sources import archives as archive_source
from laion_operator.spec import PartSpec
from laion_operator.storage import Store
from tests.support import archives as layouts
from tests.support.archives import ArchiveServer

LOOPBACK = ["127.0.0.0/8"]


def part(tmp_path, archives: dict, name: str = "out", filter_: dict | None = None, **download) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "a",
            "source": {"archives": archives},
            "output": {"uri": str(tmp_path / name)},
            "filter": {"samplesPerShard": 100, **(filter_ or {})},
            "download": {
                "outputFormat": "webdataset",
                "resizeMode": "no",
                "skipReencode": True,
                "allowedNetworks": LOOPBACK,
                "timeout": 5,
                "retries": 2,
                **download,
            },
        }
    )


def convert_all(spec: PartSpec) -> dict[int, Exception]:
    """Every unfinished shard converted as the convert stage's tasks do, without Ray; the errors by shard."""
    store = Store(spec.output)
    shards = plan(spec, store)["shards"]
    errors = {}
    for shard in range(shards):
        if store.read_json(contract.shard_stats(shard)) is not None:
            continue  # finished: the stage resumes past it
        try:
            convert_shard(spec, shard)
        except Exception as err:  # noqa: BLE001 - a shard's failure is what some tests look at
            errors[shard] = err
    return errors


def rows(spec: PartSpec) -> list[dict]:
    """Every finished shard's metadata rows."""
    store = Store(spec.output)
    found = []
    for shard in range(store.read_json(contract.MANIFEST)["shards"]):
        if store.read_json(contract.shard_stats(shard)) is not None:
            found += formats.read_metadata(store, shard).to_pylist()
    return found


def written(spec: PartSpec) -> dict[tuple[str, str], str]:
    """(archive, member) → caption of each image the part's finished shards hold, checked to be there
    once (an unfinished shard's leftovers are removed when it is redone)."""
    store = Store(spec.output)
    seen = Counter()
    captions = {}
    manifest = store.read_json(contract.MANIFEST)
    for shard in range(manifest["shards"]):
        if store.read_json(contract.shard_stats(shard)) is None:
            continue
        for sample in formats.get("webdataset").read_samples(store, shard):
            meta = sample.meta
            where = (meta["source_file"], meta["source_key"])
            seen[where] += 1
            captions[where] = sample.caption
            assert sample.image, where
    assert all(n == 1 for n in seen.values()), [w for w, n in seen.items() if n > 1]
    return captions


# --- each layout, end to end -----------------------------------------------------------------------


def journeydb_part(tmp_path, web: ArchiveServer, archives: int) -> PartSpec:
    """micro_diffusion's JourneyDB download as a part: imgs/NNN.tgz joined to the annotations archive."""
    anno = f"{web.base}/data/train/train_anno_realease_repath.jsonl.tgz#train_anno_realease_repath.jsonl"
    source = {"pattern": f"{web.base}/imgs/{{part}}.tgz", "first": 0, "last": archives - 1, "digits": 3}
    return part(tmp_path, {**source, "captions": {"annotations": anno, "key": "img_path", "caption": "prompt"}})


def test_journeydb_tgz_archives_joined_to_a_jsonl_inside_another_archive(tmp_path):
    files, samples = layouts.journeydb(archives=3, per=4)
    with ArchiveServer(files) as web:
        spec = journeydb_part(tmp_path, web, archives=3)
        assert convert_all(spec) == {}
    assert written(spec) == samples
    assert Store(spec.output).read_json(contract.MANIFEST)["inputs"] == [{"archive": f"{a:03d}.tgz"} for a in range(3)]


def test_diffusiondb_zips_captioned_by_the_json_inside_each(tmp_path):
    files, samples = layouts.diffusiondb(archives=2, per=3)
    with ArchiveServer(files) as web:
        spec = part(
            tmp_path,
            {
                "pattern": f"{web.base}/images/part-{{part}}.zip",
                "first": 1,
                "last": 2,
                "digits": 6,
                "captions": {"annotations": "#{stem}.json", "path": "*", "key": "_key", "caption": "p"},
            },
        )
        assert convert_all(spec) == {}
    assert written(spec) == samples
    assert all(r["status"] == "success" for r in rows(spec))  # the json itself is no sample


SA1B_CAPTIONS = {
    # one captions tar per image tar, paired by name: read for its own archive alone, member by member
    "paired": ("captions/{stem}.tar", "_member", "stem"),
    # every caption file in one archive (as SAM-LLaVA's SA1B_caption.tar.gz): indexed once a worker
    "shared": ("captions/SA1B_caption.tar.gz", "_member", "stem"),
    # a JSONL inside a .tgz, naming images by base name
    "jsonl": ("captions/sa1b_captions.tgz#sa1b_captions.jsonl", "image", "basename"),
}


@pytest.mark.parametrize("layout", list(SA1B_CAPTIONS))
def test_sa1b_link_file_and_captions_from_another_archive(tmp_path, layout):
    files, samples, names = layouts.sa1b(archives=3, per=2)
    where, key, join = SA1B_CAPTIONS[layout]
    with ArchiveServer(files) as web:
        web.files["links.tsv"] = layouts.links(names, web.base).encode()
        captions = {"annotations": f"{web.base}/{where}", "key": key, "caption": "caption", "joinOn": join}
        spec = part(tmp_path, {"links": f"{web.base}/links.tsv", "captions": captions})
        assert convert_all(spec) == {}
        fetched = web.fetched("captions/")
    assert written(spec) == samples
    if layout == "paired":  # each image archive's own captions, once
        assert fetched == [f"captions/{name}" for name in names.split()]
    else:  # the one annotations file, once for every archive (this process converted them all)
        assert fetched == [where.split("#")[0]]
    assert all(r["status"] == "success" for r in rows(spec))


def test_a_caption_file_archive_with_an_image_it_does_not_name_counts_it(tmp_path):
    files, samples, names = layouts.sa1b(archives=1, per=3)
    members = [(n, t) for n, t in _members(files["captions/sa_000000.tar"]) if n != "sa_2.txt"]
    files["captions/sa_000000.tar"] = layouts.tar(members)
    with ArchiveServer(files) as web:
        captions = {"annotations": f"{web.base}/captions/{{stem}}.tar", "key": "_member", "caption": "caption"}
        spec = part(tmp_path, {"urls": [f"{web.base}/sa1b/sa_000000.tar"], "captions": {**captions, "joinOn": "stem"}})
        assert convert_all(spec) == {}
    failed = {r["source_key"]: r["failure_reason"] for r in rows(spec) if r["status"] != "success"}
    assert failed == {"sa_2.jpg": "no_caption"}
    assert written(spec) == {k: v for k, v in samples.items() if k[1] != "sa_2.jpg"}


def test_a_shared_archive_of_caption_files_is_indexed_on_disk_once_a_node(tmp_path):
    from laion_operator.pipeline.sources import annotation_files
    from laion_operator.pipeline.sources.annotation_index import DiskAnnotations

    notes = [
        ("caps/sa_1.json", {"caption": "one", "seed": 1, "score": 1, "tag": "a", "masks": [1, 2]}),
        ("caps/sa_2.json", {"caption": "two", "seed": 2, "score": 0.5, "tag": None}),
        ("caps/sa_3.txt", "three"),
    ]
    members = [(n, (json.dumps(v) if isinstance(v, dict) else v).encode()) for n, v in notes]
    with ArchiveServer({"captions.tar.gz": layouts.tar(members, "w:gz")}) as web:
        captions = {"annotations": f"{web.base}/captions.tar.gz", "key": "_member", "caption": "caption"}
        spec = part(tmp_path, {"urls": ["sa_000000.tar"], "captions": {**captions, "joinOn": "stem"}})
        archives = spec.archives
        load = [archives.captions, spec.download, archives.max_archive_bytes, spec.download.max_image_bytes, {}]
        first = annotation_files.load(*load, "sa_000000")
        annotation_files._shared.cache_clear()  # another worker process of the node
        again = annotation_files.load(*load, "sa_000001")
        assert web.fetched("captions") == ["captions.tar.gz"]  # built once, then read by both
    assert isinstance(first, DiskAnnotations) and isinstance(again, DiskAnnotations)
    assert {f.name: f.type for f in first.fields} == {"seed": pa.int64(), "score": pa.float64(), "tag": pa.string()}
    assert again.find("sa_1") == ("one", {"seed": 1, "score": 1.0, "tag": "a"})
    assert again.find("sa_2") == ("two", {"seed": 2, "score": 0.5, "tag": None})
    assert again.find("sa_3") == ("three", {"seed": None, "score": None, "tag": None})
    assert again.find("sa_4") is None


def _members(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        return [(info.name, t.extractfile(info).read()) for info in t if info.isfile()]


def test_diffusiondb_metadata_columns_reach_each_row_and_its_nsfw_cut_drops_a_sample(tmp_path):
    files, samples = layouts.diffusiondb(archives=2, per=3)
    unsafe = sorted(member for _, member in samples)[2]
    files["metadata.parquet"] = layouts.diffusiondb_metadata(files, {unsafe})
    with ArchiveServer(files) as web:
        captions = {"annotations": f"{web.base}/metadata.parquet", "key": "image_name", "caption": "prompt"}
        source = {"pattern": f"{web.base}/images/part-{{part}}.zip", "first": 1, "last": 2, "digits": 6}
        spec = part(tmp_path, {**source, "captions": {**captions, "joinOn": "basename"}}, filter_={"maxPunsafe": 0.2})
        spec = PartSpec.from_dict({**spec.to_dict(), "columns": {"punsafe": "image_nsfw"}})
        assert convert_all(spec) == {}
    assert written(spec) == {k: v for k, v in samples.items() if k[1] != unsafe}
    by_member = {r["source_key"]: r for r in rows(spec)}
    dropped = by_member[unsafe]
    assert dropped["failure_reason"] == "filtered" and dropped["image_nsfw"] == 0.9
    assert "image_nsfw 0.9 fails filter.maxPunsafe 0.2" in dropped["error_message"]
    stats = [Store(spec.output).read_json(contract.shard_stats(n)) for n in range(2)]
    assert sum(s["failed_by_reason"].get("filtered", 0) for s in stats) == 1
    assert sum(s["successes"] for s in stats) == len(samples) - 1
    # every metadata column of the parquet (the image's own size aside) lands in its sample's row, typed
    for (archive, member), caption in samples.items():
        row = by_member[member]
        assert row["caption"] == caption and row["image_name"] == member
        assert row["part_id"] == int(archive[5:11]) and row["sampler"] == "k_lms" and row["prompt_nsfw"] == 0.01
    schema = formats.read_metadata(Store(spec.output), 0).schema
    assert schema.field("seed").type == pa.int64() and schema.field("cfg").type == pa.float64()
    assert schema.field("width").type == pa.int32()  # the outcome's width, the written image's


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_every_annotation_format_gives_its_other_fields_as_typed_columns(fmt):
    from laion_operator.pipeline.sources import annotation_files

    records = [
        {"img_path": "./000/a.jpg", "prompt": "a", "seed": 7, "nsfw": 0.5, "style": "x", "odd": 1},
        {"img_path": "./000/b.jpg", "prompt": "b", "seed": 8, "nsfw": 0.25, "style": None, "odd": "two"},
        {"img_path": "./000/a.jpg", "prompt": "again", "seed": 9, "nsfw": 1.0, "style": "y", "odd": 3},
    ]
    if fmt == "jsonl":
        records[0]["tags"] = {"nested": True}  # an object: no column
        del records[1]["style"]  # a field a record lacks: null there
        data = "\n".join(json.dumps(r) for r in records).encode()
    else:
        header = list(records[0])
        data = "\n".join([",".join(header)] + [",".join(str(r[h] or "") for h in header) for r in records]).encode()
    captions = PartSpec.from_dict(
        {
            "partId": "a",
            "source": {
                "archives": {
                    "urls": ["x.tgz"],
                    "captions": {"annotations": f"a.{fmt}", "key": "img_path", "caption": "prompt"},
                }
            },
            "output": {"uri": "/tmp/unused"},
        }
    ).archives.captions
    notes = annotation_files.index(captions, data, f"a.{fmt}")
    fields = {f.name: f.type for f in notes.fields}
    assert fields["seed"] == pa.int64() and fields["nsfw"] == pa.float64() and "prompt" not in fields
    assert "tags" not in fields
    assert annotation_files.lookup(captions, notes, "000/a.jpg") == (
        "a",
        {"img_path": "./000/a.jpg", "seed": 7, "nsfw": 0.5, "style": "x", "odd": "1"},
    )  # the first record naming an image wins; a field of mixed kinds is a string column
    assert annotation_files.lookup(captions, notes, "000/b.jpg")[1]["style"] is None
    assert annotation_files.lookup(captions, notes, "000/c.jpg") is None


def test_a_tar_captioned_by_its_own_json_member_after_its_images_is_fetched_once(tmp_path):
    zips, samples = layouts.diffusiondb(archives=2, per=3)
    files = {}
    for path, data in zips.items():
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # the json is the zip's last member: after the images
            members = [(name, z.read(name)) for name in z.namelist()]
        files[path.replace(".zip", ".tar.gz")] = layouts.tar(members, "w:gz")
    samples = {(a.replace(".zip", ".tar.gz"), m): c for (a, m), c in samples.items()}
    with ArchiveServer(files) as web:
        captions = {"annotations": "#{stem}.json", "path": "*", "key": "_key", "caption": "p"}
        urls = [f"{web.base}/{path}" for path in sorted(files)]
        spec = part(tmp_path, {"urls": urls, "captions": captions})
        assert convert_all(spec) == {}
        assert web.fetched("images/") == sorted(files)
    assert written(spec) == samples
    found = rows(spec)
    assert all(r["status"] == "success" for r in found)  # the json itself is no sample
    assert sorted(r["se"] for r in found) == [10, 11, 12, 20, 21, 22] and {r["sa"] for r in found} == {"k_lms"}


def test_coco_zip_joined_through_the_images_table_by_id(tmp_path):
    files, samples = layouts.coco(count=4)
    with ArchiveServer(files) as web:
        spec = part(
            tmp_path,
            {
                "urls": [f"{web.base}/coco/val2014.zip"],
                "captions": {
                    "annotations": f"{web.base}/coco/annotations/captions_val2014.json",
                    "path": "annotations[]",
                    "key": "image_id",
                    "caption": "caption",
                    "joinOn": "id",
                    "images": {"path": "images[]"},
                },
            },
        )
        assert convert_all(spec) == {}
    assert written(spec) == samples


def test_cc12m_webdataset_tars_with_txt_and_json_sidecars(tmp_path):
    files, samples = layouts.cc12m(archives=2, per=3)
    with ArchiveServer(files) as web:
        urls = [f"{web.base}/{path}" for path in sorted(files)]
        by_txt = part(tmp_path, {"urls": urls, "captions": {"sidecar": "txt"}}, "txt")
        by_json = part(tmp_path, {"urls": urls, "captions": {"sidecar": "json", "field": "caption"}}, "json")
        assert convert_all(by_txt) == {} and convert_all(by_json) == {}
    assert written(by_txt) == written(by_json) == samples
    urls = {r["source_key"]: r["url"] for r in rows(by_txt)}
    assert urls == {member: f"http://example.com/{member}" for _, member in samples}  # from key.json


def test_local_archives_and_sample_fraction_picks_whole_archives_by_seed(tmp_path):
    files, samples = layouts.cc12m(archives=8, per=1)
    folder = tmp_path / "cc12m"
    folder.mkdir()
    for path, data in files.items():
        (folder / path.rsplit("/", 1)[1]).write_bytes(data)
    source = {"pattern": str(folder / "cc12m-train-{part}.tar"), "first": 0, "last": 7, "digits": 4}
    source["captions"] = {"sidecar": "txt"}
    spec = part(tmp_path, source, filter_={"sampleFraction": 0.5, "seed": 3})
    listed = {"urls": sorted((str(p) for p in folder.iterdir()), reverse=True), "captions": {"sidecar": "txt"}}
    again = part(tmp_path, listed, "again", filter_={"sampleFraction": 0.5, "seed": 3})
    assert convert_all(spec) == {} and convert_all(again) == {}
    kept = written(spec)
    assert 0 < len(kept) < len(samples)
    assert kept == written(again) == {k: v for k, v in samples.items() if k in kept}
    picked = {a for a, _ in kept}
    assert picked == {
        f"cc12m-train-{a:04d}.tar" for a in range(8) if archive_source.picked(f"cc12m-train-{a:04d}.tar", 0.5, 3)
    }


# --- what each sample became ---------------------------------------------------------------------


def test_uncaptioned_non_image_and_small_images_are_counted_by_reason(tmp_path):
    members = [
        ("000/big.jpg", layouts.image(1, (300, 300))),
        ("000/small.jpg", layouts.image(2, (100, 300))),
        ("000/nocaption.jpg", layouts.image(3, (300, 300))),
        ("000/broken.jpg", b"<html>not a jpeg</html>"),
        ("000/README.md", b"# JourneyDB"),
    ]
    lines = [
        {"img_path": "./000/big.jpg", "prompt": "big"},
        {"img_path": "./000/small.jpg", "prompt": "small"},
        {"img_path": "./000/broken.jpg", "prompt": "broken"},
    ]
    files = {"imgs/000.tgz": layouts.tar(members, "w:gz"), "anno.jsonl": "\n".join(map(json.dumps, lines)).encode()}
    with ArchiveServer(files) as web:
        spec = part(
            tmp_path,
            {
                "urls": [f"{web.base}/imgs/000.tgz"],
                "captions": {"annotations": f"{web.base}/anno.jsonl", "key": "img_path", "caption": "prompt"},
            },
            filter_={"minWidth": 256, "minHeight": 256},
        )
        assert convert_all(spec) == {}
    by_member = {r["source_key"]: r for r in rows(spec)}
    assert {k: r["failure_reason"] for k, r in by_member.items()} == {
        "000/big.jpg": None,
        "000/small.jpg": "too_small",
        "000/nocaption.jpg": "no_caption",
        "000/broken.jpg": "decode",
        "000/README.md": "decode",
    }
    for member, row in by_member.items():
        if row["failure_reason"]:
            assert "000.tgz" in row["error_message"] and member in row["error_message"], row
    stats = Store(spec.output).read_json(contract.shard_stats(0))
    assert stats["successes"] == 1
    assert stats["failed_by_reason"] == {"too_small": 1, "no_caption": 1, "decode": 2}
    assert written(spec) == {("000.tgz", "000/big.jpg"): "big"}


# --- archives that go wrong ------------------------------------------------------------------------


def _cc12m_part(tmp_path, web, files, name="out", **archives):
    urls = [f"{web.base}/{path}" for path in sorted(files)]
    return part(tmp_path, {"urls": urls, "captions": {"sidecar": "txt"}, **archives}, name)


def test_a_truncated_archive_names_itself_and_its_last_member_and_the_others_are_kept(tmp_path):
    files, samples = layouts.cc12m(archives=2, per=3)
    whole = files["cc12m/cc12m-train-0001.tar"]
    files["cc12m/cc12m-train-0001.tar"] = whole[: len(whole) // 2 + 100]
    with ArchiveServer(files) as web:
        spec = _cc12m_part(tmp_path, web, files)
        errors = convert_all(spec)
    assert list(errors) == [1] and isinstance(errors[1], InputError)
    assert "cc12m-train-0001.tar" in str(errors[1]) and "member 0001" in str(errors[1]), errors[1]
    assert written(spec) == {k: v for k, v in samples.items() if k[0] == "cc12m-train-0000.tar"}


def test_an_annotation_line_without_its_fields_names_the_file_and_line(tmp_path):
    files, _ = layouts.journeydb(archives=1, per=2)
    lines = [json.dumps({"img_path": "./000/a.jpg", "prompt": "p"}), json.dumps({"img_path": "./000/b.jpg"})]
    files["anno.jsonl"] = "\n".join(lines).encode()
    with ArchiveServer(files) as web:
        spec = part(
            tmp_path,
            {
                "urls": [f"{web.base}/imgs/000.tgz"],
                "captions": {"annotations": f"{web.base}/anno.jsonl", "key": "img_path", "caption": "prompt"},
            },
        )
        errors = convert_all(spec)
    assert "anno.jsonl line 2: no 'prompt' field (spec.source.archives.captions.caption)" in str(errors[0])
    assert isinstance(errors[0], InputError)


def test_an_archive_over_max_archive_bytes_is_refused_before_it_is_read(tmp_path):
    files, samples = layouts.cc12m(archives=2, per=3)
    files["cc12m/cc12m-train-0001.tar"] += b"\0" * 20_000  # tar's end padding: the same archive, larger
    with ArchiveServer(files) as web:
        spec = _cc12m_part(tmp_path, web, files, maxArchiveBytes=len(files["cc12m/cc12m-train-0000.tar"]) + 1024)
        errors = convert_all(spec)
    assert list(errors) == [1] and isinstance(errors[1], InputError)
    assert "cc12m-train-0001.tar: too_large" in str(errors[1]) and "more than" in str(errors[1])
    assert len(written(spec)) == 3


def test_a_zip_bomb_and_a_gzip_bomb_are_refused_naming_the_member(tmp_path):
    zeros = b"\0" * (40 << 20)
    files = {
        "bomb.zip": layouts.zipped([("a.jpg", layouts.image(1)), ("zeros.jpg", zeros)], zipfile.ZIP_DEFLATED),
        "bomb.tgz": layouts.tar([("a.jpg", layouts.image(1)), ("a.txt", b"x"), ("zeros.jpg", zeros)], "w:gz"),
    }
    with ArchiveServer(files) as web:
        spec = part(
            tmp_path, {"urls": [f"{web.base}/bomb.zip", f"{web.base}/bomb.tgz"], "captions": {"sidecar": "txt"}}
        )
        errors = convert_all(spec)
    assert "bomb.zip: member zeros.jpg: refused" in str(errors[0]) and "decompression bomb" in str(errors[0])
    assert "bomb.tgz: member zeros.jpg: refused" in str(errors[1]) and "decompression bomb" in str(errors[1])


@pytest.mark.parametrize("name", ["../../escape.jpg", "/etc/escape.jpg", "ok/../../escape.jpg"])
def test_members_leading_outside_the_archive_are_refused_and_nothing_is_written_outside(tmp_path, name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member in ("good.jpg", name):
            data = layouts.image(5)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    spec = part(tmp_path, {"urls": [str(tmp_path / "evil.tar")], "captions": {"sidecar": "txt"}})
    errors = convert_all(spec)
    assert f"evil.tar: member {name!r}: refused" in str(errors[0]) and isinstance(errors[0], InputError)
    assert not list(tmp_path.parent.rglob("escape.jpg"))
    assert not (tmp_path / "out" / "00000_stats.json").exists()


# --- expiring links, resuming ---------------------------------------------------------------------


def test_expired_links_fail_as_expired_and_a_new_link_file_fetches_only_the_rest(tmp_path):
    files, samples, names = layouts.sa1b(archives=4, per=2)
    captions = {"sidecar": "json", "field": "caption"}
    for name in names.split():  # captions in each sa_N.json this time, to keep the part's own archives only
        members = []
        with tarfile.open(fileobj=io.BytesIO(files[f"sa1b/{name}"])) as t:
            for info in t:
                data = t.extractfile(info).read()
                if info.name.endswith(".json"):
                    data = json.dumps({"caption": samples[(name, info.name[:-5] + ".jpg")]}).encode()
                members.append((info.name, data))
        files[f"sa1b/{name}"] = layouts.tar(members)
    with ArchiveServer(files) as web:
        web.files["links1.tsv"] = layouts.links(names, web.base, "old").encode()
        web.expired = {"sa1b/sa_000002.tar", "sa1b/sa_000003.tar"}
        spec = part(tmp_path, {"links": f"{web.base}/links1.tsv", "captions": captions})
        errors = convert_all(spec)
        assert sorted(errors) == [2, 3]
        assert all(isinstance(e, InputError) and getattr(e, "reason", "") == "expired" for e in errors.values())
        assert "sa_000002.tar: expired" in str(errors[2]) and "Signature" not in str(errors[2])
        assert len(written(spec)) == 4

        web.expired = set()
        web.files["links2.tsv"] = layouts.links(names, web.base, "new").encode()
        web.requests.clear()
        renewed = part(tmp_path, {"links": f"{web.base}/links2.tsv", "captions": captions})
        assert contract.fingerprint(renewed) == contract.fingerprint(spec)
        assert convert_all(renewed) == {}
        assert web.fetched("sa1b/") == ["sa1b/sa_000002.tar", "sa1b/sa_000003.tar"]
    assert written(renewed) == samples


def test_a_connection_lost_mid_archive_resumes_by_range(tmp_path):
    files, samples = layouts.cc12m(archives=1, per=40)
    with ArchiveServer(files) as web:
        web.cut = {"cc12m/cc12m-train-0000.tar"}
        spec = _cc12m_part(tmp_path, web, files)
        assert convert_all(spec) == {}
        asked = [r for p, r in web.requests if p.startswith("cc12m/")]
    assert asked[0] is None and asked[1] == f"bytes={len(files['cc12m/cc12m-train-0000.tar']) // 2}-"
    assert written(spec) == samples


def test_an_interrupted_part_resumes_with_each_sample_once(tmp_path):
    files, samples = layouts.journeydb(archives=3, per=3)
    with ArchiveServer(files) as web:
        spec = journeydb_part(tmp_path, web, archives=3)
        store = Store(spec.output)
        plan(spec, store)
        convert_shard(spec, 0)
        # shard 1 interrupted mid-way: samples written, no stats file
        interrupted = iter(archive_source.SOURCE.read_input(spec, {"archive": "001.tgz"}))
        next(interrupted)
        (tmp_path / "out" / "00001.tar").write_bytes(b"half a shard")
        web.requests.clear()
        assert convert_all(spec) == {}
        assert sorted(set(web.fetched("imgs/"))) == ["imgs/001.tgz", "imgs/002.tgz"]
    assert written(spec) == samples
    assert sum(r["status"] == "success" for r in rows(spec)) == len(samples)


def test_archives_that_cannot_be_fetched_are_counted_under_their_reason(tmp_path):
    from laion_operator.pipeline.tracker import Tracker

    files, _ = layouts.cc12m(archives=4, per=1)
    files["cc12m/cc12m-train-0001.tar"] += b"\0" * 20_000
    with ArchiveServer(files) as web:
        web.expired = {"cc12m/cc12m-train-0002.tar"}
        urls = [f"{web.base}/{path}" for path in sorted(files)] + [f"{web.base}/cc12m/gone.tar"]
        most = len(files["cc12m/cc12m-train-0000.tar"]) + 1024
        spec = part(tmp_path, {"urls": urls, "captions": {"sidecar": "txt"}, "maxArchiveBytes": most})
        errors = convert_all(spec)
    assert sorted(errors) == [1, 2, 4]
    # the part's progress (what the status and the metrics show) as the shard stage's ticks leave it
    tracker = Tracker(Store(spec.output), contract.Progress(part_id="a"), None)
    tracker.finished = {
        s: contract.ShardStats.from_json(Store(spec.output).read_json(contract.shard_stats(s))) for s in (0, 3)
    }
    tracker.tick({}, True, len(errors), errors)
    progress = Store(spec.output).read_json(contract.PROGRESS)
    assert progress["failed_by_reason"] == {"too_large": 1, "expired": 1, "http_4xx": 1}
    assert progress["shards_failed"] == 3 and progress["images_ok"] == 2


def test_archives_are_fetched_through_dns_servers_with_the_image_fetches_user_agent(tmp_path):
    from laion_operator.pipeline.fetch.engine import user_agent
    from tests.pipeline.test_fetch import TinyDNS

    files, samples = layouts.cc12m(archives=2, per=2)
    dns = TinyDNS({"archives.example": "127.0.0.1"})
    try:
        with ArchiveServer(files) as web:
            port = web.base.rsplit(":", 1)[1]
            urls = [f"http://archives.example:{port}/{path}" for path in sorted(files)]
            urls_of = {"urls": urls, "captions": {"sidecar": "txt"}}
            spec = part(tmp_path, urls_of, dnsServers=[dns.address], userAgentToken="laionbot")
            assert convert_all(spec) == {}
            agents = set(web.agents)
            blocked = part(tmp_path, urls_of, "blocked", dnsServers=[dns.address], allowedNetworks=[])
            errors = convert_all(blocked)
    finally:
        dns.close()
    assert written(spec) == samples
    assert {name for name, kind in dns.queries if kind == 1} == {"archives.example"}
    assert agents == {user_agent(spec.download)} and "compatible; laionbot" in user_agent(spec.download)
    assert sorted(errors) == [0, 1] and getattr(errors[0], "reason", "") == "blocked_address"
    assert "archives.example resolves to 127.0.0.1" in str(errors[0])


def test_an_archive_served_slower_than_min_body_rate_fails_as_timeout_and_a_steady_one_is_read(tmp_path):
    files, samples = layouts.cc12m(archives=2, per=4)  # about 10 KB a tar
    with ArchiveServer(files) as web:
        web.slow = {"cc12m/cc12m-train-0000.tar": 4_000, "cc12m/cc12m-train-0001.tar": 40_000}
        urls = [f"{web.base}/{path}" for path in sorted(files)]
        paced = {"timeout": 1, "minBodyRate": 8_000, "retries": 0}
        spec = part(tmp_path, {"urls": urls, "captions": {"sidecar": "txt"}}, **paced)
        errors = convert_all(spec)
    assert list(errors) == [0] and getattr(errors[0], "reason", "") == "timeout"
    assert "cc12m-train-0000.tar: timeout" in str(errors[0]) and "minBodyRate (8000 bytes/s over 1 s)" in str(errors[0])
    assert written(spec) == {k: v for k, v in samples.items() if k[0] == "cc12m-train-0001.tar"}


# --- a gated repository's headers --------------------------------------------------------------------


def test_headers_secret_reaches_the_repository_not_the_cdn_it_redirects_to(tmp_path, monkeypatch):
    files, samples = layouts.cc12m(archives=2, per=2)
    token = "Bearer hf_notarealtoken"
    with ArchiveServer(files) as repo, ArchiveServer(files, host="127.0.0.2") as cdn:
        repo.redirects = {"resolve/cc12m-train-0001.tar": f"{cdn.base}/cc12m/cc12m-train-0001.tar"}
        repo.auth = {path: token for path in [*files, *repo.redirects]}
        urls = [f"{repo.base}/cc12m/cc12m-train-0000.tar", f"{repo.base}/resolve/cc12m-train-0001.tar"]
        spec = part(tmp_path, {"urls": urls, "headersSecret": "hf-token", "captions": {"sidecar": "txt"}})
        errors = convert_all(spec)
        assert sorted(errors) == [0, 1] and "cc12m-train-0000.tar: http_4xx" in str(errors[0])
        assert token not in str(errors[0])

        monkeypatch.setenv(credentials.ARCHIVE_HEADERS, f"Authorization: {token}\nX-Other: 1")
        assert convert_all(spec) == {}
        assert ("cc12m/cc12m-train-0000.tar", token) in repo.authorizations
        assert cdn.authorizations == [("cc12m/cc12m-train-0001.tar", None)]
    assert written(spec) == samples
    assert token not in json.dumps(spec.to_dict())


# --- the whole part on Ray --------------------------------------------------------------------------


def test_a_part_on_ray_says_its_links_expired_and_a_new_link_file_finishes_it(ray_driver, tmp_path):
    from laion_operator.pipeline.driver import run_part

    files, samples, names = layouts.sa1b(archives=4, per=2)
    with ArchiveServer(files) as web:
        web.files["links1.tsv"] = layouts.links(names, web.base, "old").encode()
        captions = {
            "annotations": f"{web.base}/captions/sa1b_captions.tgz#sa1b_captions.jsonl",
            "key": "image",
            "caption": "caption",
            "joinOn": "basename",
        }
        web.expired = {"sa1b/sa_000001.tar"}
        spec = part(tmp_path, {"links": f"{web.base}/links1.tsv", "captions": captions}, outputFormat="mds")
        with pytest.raises(InputError, match=r"sa_000001.tar: expired: .* the signed link has expired"):
            run_part(spec)
        progress = Store(spec.output).read_json(contract.PROGRESS)
        assert progress["phase"] == "Failed" and "expired" in progress["message"]
        assert progress["failed_by_reason"] == {"expired": 1} and progress["shards_failed"] == 1
        assert "Signature" not in progress["message"]

        web.expired = set()
        web.files["links2.tsv"] = layouts.links(names, web.base, "new").encode()
        web.requests.clear()
        renewed = part(tmp_path, {"links": f"{web.base}/links2.tsv", "captions": captions}, outputFormat="mds")
        summary = run_part(renewed)
        assert web.fetched("sa1b/") == ["sa1b/sa_000001.tar"]
    assert summary["images"]["ok"] == summary["images"]["attempted"] == len(samples)
    assert summary["shards"] == {"total": 4, "done": 4, "failed": 0} and summary["verified"]["ok"]
    store = Store(renewed.output)
    found = {
        (s.meta["source_file"], s.meta["source_key"]): s.caption
        for n in range(4)
        for s in formats.get("mds").read_samples(store, n)
    }
    assert found == samples


def test_archives_on_s3_a_zip_spooled_and_a_tar_streamed(s3, tmp_path):
    zips, zip_samples = layouts.diffusiondb(archives=1, per=3)
    tars, tar_samples = layouts.journeydb(archives=1, per=3)
    bucket = s3.create_bucket("laion-archives")
    for path, data in {**zips, **tars}.items():
        s3.client().put_object(Bucket=bucket, Key=path, Body=data)
    output = {"uri": f"s3://{bucket}/out", "endpoint": s3.endpoint, "region": "us-east-1", "pathStyle": True}
    captions = {"annotations": "#{stem}.json", "path": "*", "key": "_key", "caption": "p"}
    diffusiondb = part(tmp_path, {"urls": [f"s3://{bucket}/images/part-000001.zip"], "captions": captions})
    diffusiondb = PartSpec.from_dict({**diffusiondb.to_dict(), "output": output})
    assert convert_all(diffusiondb) == {}
    assert written(diffusiondb) == zip_samples

    anno = f"s3://{bucket}/data/train/train_anno_realease_repath.jsonl.tgz#train_anno_realease_repath.jsonl"
    captions = {"annotations": anno, "key": "img_path", "caption": "prompt"}
    journeydb = part(tmp_path, {"urls": [f"s3://{bucket}/imgs/000.tgz"], "captions": captions})
    journeydb = PartSpec.from_dict({**journeydb.to_dict(), "output": {**output, "uri": f"s3://{bucket}/jdb"}})
    assert convert_all(journeydb) == {}
    assert written(journeydb) == tar_samples


def test_the_workers_warm_up_with_what_a_convert_shard_imports(tmp_path):
    """A convert part's workers import the convert stage, its source and its format's writer while Ray
    starts (an MDS writer's first open costs seconds of imports otherwise, in every worker's first shard)."""
    import importlib.util
    import subprocess
    import sys

    from laion_operator.pipeline.local import warm_imports

    mds = part(tmp_path, {"urls": ["a.tar"], "captions": {"sidecar": "txt"}}, outputFormat="mds")
    (tmp_path / "mds").mkdir()
    names = warm_imports(mds)
    assert "laion_operator.pipeline.sources.archives" in names and "streaming" in names
    assert all(importlib.util.find_spec(name) is not None for name in names)
    # after the warm-up, opening an MDS shard's writer imports nothing of note
    code = (
        "import importlib, sys\n"
        f"[importlib.import_module(n) for n in {names!r}]\n"
        "before = set(sys.modules)\n"
        "from laion_operator.pipeline import convert, formats, record\n"
        "from laion_operator.spec import PartSpec\n"
        f"spec = PartSpec.from_dict({mds.to_dict()!r})\n"
        "schema = record.schema(convert.SOURCE)\n"
        f"formats.get('mds').writer(spec.download, 0, {str(tmp_path / 'mds')!r}, True, schema).close()\n"
        "print(len(set(sys.modules) - before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 20, done.stdout
