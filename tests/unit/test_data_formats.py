"""Input readers (LLaVA JSONL/JSON, caption pairs, WebDataset tars) and image header parsing."""

import io
import json
import tarfile

import pytest
from PIL import Image

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data.images.imageinfo import image_info
from megatron_sail.data.preprocess.formats import (
    detect_format,
    expand_inputs,
    iter_records,
    named_files,
    to_conversation,
)
from megatron_sail.data.template import SampleError


def encode(size, fmt):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_header_size_without_decoding_and_bytes_kept(fmt):
    data = encode((123, 45), fmt)
    out, w, h = image_info(data)
    assert (w, h) == (123, 45) and out is data


def test_progressive_jpeg_with_exif_thumbnail_size():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(
        buf, format="JPEG", progressive=True, exif=Image.Exif().tobytes()
    )
    assert image_info(buf.getvalue())[1:] == (300, 200)


def test_other_formats_are_reencoded_losslessly_to_png():
    img = Image.new("RGB", (31, 17))
    img.putpixel((3, 4), (9, 8, 7))
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    out, w, h = image_info(buf.getvalue())
    assert (w, h) == (31, 17) and out.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(out)).convert("RGB").getpixel((3, 4)) == (9, 8, 7)


@pytest.mark.parametrize(
    "data,reason",
    [
        (encode((64, 64), "PNG")[:-20], "truncated_image"),
        (encode((64, 64), "JPEG")[:-50], "truncated_image"),
        (encode((64, 64), "JPEG")[:20], "truncated_image"),
        (b"", "truncated_image"),
        (b"this is not an image at all", "undecodable_image"),
        (encode((64, 64), "BMP")[:40], "truncated_image"),
    ],
)
def test_broken_images_are_rejected_with_reason(data, reason):
    with pytest.raises(SampleError) as e:
        image_info(data)
    assert e.value.reason == reason


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_llava_jsonl_and_json_array_with_image_root(tmp_path):
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    (imgdir / "a.png").write_bytes(encode((10, 20), "PNG"))
    row = {
        "id": "1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    write_jsonl(
        tmp_path / "d.jsonl",
        [row, "", {"id": "2", "conversations": row["conversations"][:1] + [{"from": "gpt", "value": "B"}]}],
    )
    (tmp_path / "d.json").write_text(json.dumps([row]))
    assert detect_format(str(tmp_path / "d.jsonl")) == "llava"
    assert detect_format(str(tmp_path / "d.json")) == "llava"
    recs = list(iter_records([str(tmp_path / "d.jsonl"), str(tmp_path / "d.json")], "llava", str(imgdir)))
    assert [r.key for r in recs] == ["line 1", "line 3", "item 0"]
    turns, images = to_conversation(recs[0], "llava", 0, TemplateConfig(), 0)
    assert turns[1]["value"] == "A" and images == [(imgdir / "a.png").read_bytes()]
    assert to_conversation(recs[1], "llava", 1, TemplateConfig(), 0)[1] == []
    assert to_conversation(recs[2], "llava", 2, TemplateConfig(), 0)[1] == images
    # without --image-root, paths resolve against the input file's directory: missing here
    rec = next(iter_records([str(tmp_path / "d.jsonl")], "llava", None))
    with pytest.raises(SampleError) as e:
        to_conversation(rec, "llava", 0, TemplateConfig(), 0)
    assert e.value.reason == "missing_image" and "a.png" in e.value.detail


def test_caption_pairs_get_a_seeded_prompt(tmp_path):
    (tmp_path / "x.jpg").write_bytes(encode((8, 8), "JPEG"))
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"image": "x.jpg", "caption": " a cat "},
            {"image": "x.jpg", "text": "b"},
            {"image": "x.jpg", "caption": ""},
        ],
    )
    assert detect_format(str(tmp_path / "c.jsonl")) == "caption"
    cfg = TemplateConfig(caption_prompts=("P1", "P2", "P3"))
    recs = list(iter_records([str(tmp_path / "c.jsonl")], "caption", None))
    t0, imgs = to_conversation(recs[0], "caption", 0, cfg, seed=5)
    assert t0[0]["from"] == "human" and t0[0]["value"] in cfg.caption_prompts
    assert t0[1] == {"from": "gpt", "value": "a cat"} and len(imgs) == 1
    assert to_conversation(recs[1], "caption", 1, cfg, seed=5)[0][1]["value"] == "b"
    prompts = {to_conversation(recs[0], "caption", i, cfg, seed=5)[0][0]["value"] for i in range(30)}
    assert len(prompts) > 1  # the prompt varies with the sample index
    assert to_conversation(recs[0], "caption", 7, cfg, 5) == to_conversation(recs[0], "caption", 7, cfg, 5)
    with pytest.raises(SampleError):
        to_conversation(recs[2], "caption", 2, cfg, 5)


def make_tar(path, samples, truncate=False):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:700])


def test_webdataset_tar_groups_members_by_key(tmp_path):
    jpg, png = encode((16, 8), "JPEG"), encode((8, 16), "PNG")
    make_tar(
        tmp_path / "s0.tar",
        [
            ("000.jpg", jpg),
            ("000.txt", b"red box"),
            ("001.png", png),
            ("001.json", json.dumps({"caption": "blue"}).encode()),
            ("002.txt", b"no image"),
        ],
    )
    files = expand_inputs([str(tmp_path / "*.tar")])
    assert detect_format(files[0]) == "webdataset"
    # a directory as img2dataset leaves it: shards plus a stats file per shard (not data)
    (tmp_path / "s0_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    assert expand_inputs([str(tmp_path)]) == files == [str(tmp_path / "s0.tar")]
    recs = list(iter_records(files, "webdataset", None))
    assert [r.key for r in recs] == ["000", "001", "002"]
    t, imgs = to_conversation(recs[0], "webdataset", 0, TemplateConfig(), 0)
    assert t[1]["value"] == "red box" and imgs == [jpg]
    t, imgs = to_conversation(recs[1], "webdataset", 1, TemplateConfig(), 0)
    assert t[1]["value"] == "blue" and imgs == [png]
    with pytest.raises(SampleError) as e:
        to_conversation(recs[2], "webdataset", 2, TemplateConfig(), 0)
    assert e.value.reason == "missing_image"


def test_truncated_tar_becomes_a_reject_not_a_crash(tmp_path):
    make_tar(tmp_path / "t.tar", [("000.jpg", encode((64, 64), "JPEG")), ("000.txt", b"x")], truncate=True)
    recs = list(iter_records([str(tmp_path / "t.tar")], "webdataset", None))
    assert recs[-1].error and recs[-1].error.startswith("truncated_shard")
    with pytest.raises(SampleError) as e:
        to_conversation(recs[-1], "webdataset", 0, TemplateConfig(), 0)
    assert e.value.reason == "truncated_shard"


def test_inputs_directories_and_bad_names(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match="--format"):
        detect_format(str(tmp_path / "odd.jsonl"))
    write_jsonl(tmp_path / "junk.jsonl", ["{broken", "not json either"])
    with pytest.raises(ValueError, match="--format"):
        detect_format(str(tmp_path / "junk.jsonl"))
    # a broken first line does not hide the format of the rest (it becomes an invalid_json reject)
    write_jsonl(tmp_path / "c.jsonl", ["{broken", {"image": "x.jpg", "caption": "c"}])
    assert detect_format(str(tmp_path / "c.jsonl")) == "caption"


def test_named_files_from_a_folder_a_glob_or_one_file(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "a.rejects.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    folder = named_files(str(tmp_path), ".jsonl", exclude=(".rejects.jsonl",))
    assert folder == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert len(named_files(str(tmp_path), ".jsonl")) == 3
    assert named_files(str(tmp_path / "*.txt"), ".jsonl") == [str(tmp_path / "c.txt")]
    assert named_files(str(tmp_path / "b.jsonl"), ".jsonl") == [str(tmp_path / "b.jsonl")]
    assert named_files(str(tmp_path / "missing.jsonl"), ".jsonl") == []
    assert named_files(str(tmp_path / "*.none"), ".jsonl") == []
