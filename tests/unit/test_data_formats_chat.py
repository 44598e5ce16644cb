"""Chat `messages` inputs (OpenAI, Hugging Face content parts, ms-swift), media that must not be
dropped silently (remote URLs, the plural `images` key, data: URIs, InternVL videos as frames;
other video shapes rejected) and InternVL meta files.

The sample files in tests/unit/format_samples/ follow the shapes documented by each project
(see docs/data.md "Inputs"); the images they name are written by the tests.
"""

import base64
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import preprocess_data
from megatron_sail.config.data import PackingConfig, PreprocessConfig, TemplateConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data.preprocess.formats import detect_format, iter_records, to_conversation
from megatron_sail.data.preprocess.media_refs import decode_data_uri, plain_ref
from megatron_sail.data.preprocess.pipeline import run
from megatron_sail.data.preprocess.video import VideoClip, VideoConfig, expand_videos, segment_middles
from megatron_sail.data.template import SampleError, normalize_turns

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "format_samples")
TILING = TilingConfig(tile_size=32, min_tiles=1, max_tiles=4, thumbnail=True, tokens_per_tile=4)


def encode(size, color, fmt):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder):
    os.makedirs(folder, exist_ok=True)
    files = {
        "wide.png": encode((96, 64), (220, 20, 20), "PNG"),
        "tall.jpg": encode((64, 96), (20, 20, 220), "JPEG"),
    }
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return files


def write_clip(path, frames=20, size=(64, 48)):
    """An MPEG-4 clip whose frame i is uniformly grey at level 10 * i (time order is visible)."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(
                np.full((size[1], size[0], 3), 10 * i, np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def samples(tmp_path):
    """A copy of the sample files with the images and the clip they name."""
    root = tmp_path / "samples"
    shutil.copytree(SAMPLES, root)
    write_clip(root / "clips" / "run.mp4")
    return root, write_images(root / "images")


FRAMES = VideoConfig(num_frames=4, frame_size=32)
FRAME_TOKENS = "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\n"


def parse_all(path, fmt=None):
    """(turns, images, normalized turns) or the SampleError reason of every record of a file,
    as SampleBuilder.build sees them (a video clip expanded into 4 frames)."""
    fmt = fmt or detect_format(str(path))
    out = []
    for i, rec in enumerate(iter_records([str(path)], fmt, None)):
        try:
            turns, images = expand_videos(*to_conversation(rec, fmt, i, TemplateConfig(), 0), FRAMES)
            out.append((turns, images, normalize_turns(turns, len(images), TemplateConfig())))
        except SampleError as e:
            out.append(e.reason)
    return fmt, out


def data_uri_png(path):
    line = open(path).readline()
    return base64.b64decode(line.split("base64,")[1].split('"')[0])


def test_openai_chat_completions_messages(samples):
    root, files = samples
    fmt, recs = parse_all(root / "openai_chat.jsonl")
    assert fmt == "messages"
    turns, images, norm = recs[0]
    assert images == [data_uri_png(root / "openai_chat.jsonl")] and images[0].startswith(b"\x89PNG")
    assert norm == [("user", "What colour is the square?<image>\n"), ("assistant", "Red.")]
    turns, images, norm = recs[1]
    assert images == [files["wide.png"]]
    assert norm == [
        ("system", "Answer in one word."),
        ("user", "<image>\nWhich shape is this?"),
        ("assistant", "A circle."),
    ]
    assert recs[2] == "remote_url"
    assert recs[3][1] == [] and recs[3][2][-1] == ("assistant", "Four.")


def test_hugging_face_content_parts(samples):
    root, files = samples
    fmt, recs = parse_all(root / "hf_content_parts.jsonl")
    assert fmt == "messages"
    assert recs[0][1] == [files["tall.jpg"]]  # {"type": "image"} filled from the `images` column
    assert recs[0][2][0] == ("user", "<image>\nWhat colour is it?")
    turns, images, norm = recs[1]  # images carried by the parts themselves, in order
    assert images == [files["wide.png"], files["tall.jpg"]]
    assert norm[1] == ("user", "Compare <image>\nand <image>\n")
    assert len(recs[2][1]) == 4 and recs[2][2][0] == ("user", FRAME_TOKENS + "What happens?")


def test_ms_swift_messages_and_images(samples):
    root, files = samples
    fmt, recs = parse_all(root / "ms_swift.jsonl")
    assert fmt == "messages"
    turns, images, norm = recs[0]
    assert images == [files["wide.png"], files["tall.jpg"]]
    assert [r for r, _ in norm] == ["system", "user", "assistant", "user", "assistant"]
    assert norm[1][1].startswith("<image><image>What")
    assert recs[1][1][0].startswith(b"\x89PNG")  # a data: URI in the images list
    assert len(recs[2][1]) == 4 and recs[2][2][0] == ("user", FRAME_TOKENS + "What is the person doing?")
    assert recs[3][1] == []


def test_messages_image_count_mismatches_are_rejects(tmp_path):
    def one(record):
        path = tmp_path / "m.jsonl"
        path.write_text(json.dumps(record) + "\n")
        return parse_all(path, "messages")[1][0]

    assistant = {"role": "assistant", "content": "ok"}
    two_tags = {"role": "user", "content": "<image><image>?"}
    assert one({"messages": [two_tags, assistant], "images": ["a.png"]}) == "placeholder_mismatch"
    assert (
        one({"messages": [{"role": "user", "content": "<image>?"}, assistant], "images": ["a.png", "b.png"]})
        == "placeholder_mismatch"
    )
    assert (
        one({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}, assistant]})
        == "audio_unsupported"
    )
    assert one({"messages": [{"role": "tool", "content": "42"}, assistant]}) == "unknown_role"
    assert (
        one({"messages": [{"role": "user", "content": "hi"}, {**assistant, "weight": 0}]})
        == "message_weight_unsupported"
    )
    assert (
        one({"messages": [{"role": "user", "content": "hi"}, {**assistant, "weight": 1}]})
        != "message_weight_unsupported"
    )
    assert one({"messages": [{"role": "user", "content": [{"type": "file"}]}, assistant]}) == "bad_sample"
    assert (
        one({"messages": [{"role": "user", "content": "<video><video>?"}, assistant], "videos": ["v.mp4"]})
        == "placeholder_mismatch"
    )
    assert (
        one(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": ["f1.jpg", "f2.jpg"]}]},
                    assistant,
                ]
            }
        )
        == "video_unsupported"
    )  # a list of frames, not a clip


def test_internvl_video_becomes_frames_and_plural_images_are_accepted(samples):
    """InternVL's video record: 4 frames from the middle of 4 equal segments of the 20-frame
    clip, one 32 px tile each, `Frame1: <image>` ... in time order in place of <video>."""
    root, files = samples
    recs = list(iter_records([str(root / "internvl_video.jsonl")], "llava", None))
    assert detect_format(str(root / "internvl_video.jsonl")) == "llava"
    turns, blobs = to_conversation(recs[0], "llava", 0, TemplateConfig(), 0)
    assert len(blobs) == 1 and isinstance(blobs[0], VideoClip)
    turns, frames = expand_videos(turns, blobs, FRAMES)
    assert turns[0]["value"] == FRAME_TOKENS + "What is the person doing?"
    levels = []
    for data in frames:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (32, 32)
        levels.append(np.asarray(img.convert("L"), np.float32).mean())
    assert np.allclose(levels, [20, 70, 120, 170], atol=12), levels  # frames 2, 7, 12, 17
    with pytest.raises(SampleError) as e:
        expand_videos(*to_conversation(recs[0], "llava", 0, TemplateConfig(), 0), VideoConfig(num_frames=0))
    assert e.value.reason == "video_unsupported"
    turns, images = to_conversation(recs[1], "llava", 1, TemplateConfig(), 0)
    assert images == [files["wide.png"], files["tall.jpg"]]
    assert segment_middles(20, 4) == [2, 7, 12, 17] and segment_middles(3, 8) == [0, 1, 2]


def test_video_end_to_end_one_tile_per_frame(samples, tiny_tokenizer, tmp_path):
    root, _ = samples
    cfg = PreprocessConfig(
        inputs=[str(root / "internvl_video.jsonl")],
        output_prefix=str(tmp_path / "v"),
        tokenizer=tiny_tokenizer,
        tiling=TILING,
        video_frames=4,
        packing=PackingConfig(seq_length=512, packing_buffer=16, seed=1),
    )
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0 and summary["images"] == 6 and summary["rejects"] == {}, summary
    grids = np.load(tmp_path / "v.images_meta.npy")[:, :3]
    assert sorted(map(tuple, grids.tolist())).count((1, 1, 0)) == 4  # frames: one tile, no thumbnail
    code, summary = run(
        dataclasses.replace(cfg, video_frames=0, max_reject_rate=0.5, output_prefix=str(tmp_path / "off")),
        log=lambda m: None,
    )
    assert code == 0 and summary["rejects"] == {"video_unsupported": 1}


def test_caption_records_keyed_url_are_remote_url_rejects(samples):
    root, files = samples
    fmt, recs = parse_all(root / "caption_urls.jsonl")
    assert fmt == "caption"
    assert recs[0] == "remote_url"
    assert recs[1][1] == [files["wide.png"]]


def test_data_uris_decode_and_are_size_capped():
    png = encode((5, 3), (1, 2, 3), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_uri(uri) == png
    assert plain_ref({"bytes": base64.b64encode(png).decode(), "path": None}).startswith("data:;base64,")
    assert plain_ref({"bytes": None, "path": "a/b.png"}) == "a/b.png"
    with pytest.raises(SampleError):
        plain_ref({"width": 3})
    with pytest.raises(SampleError) as e:
        decode_data_uri(uri, max_bytes=len(png) // 2)
    assert e.value.reason == "file_too_large"
    with pytest.raises(SampleError) as e:
        decode_data_uri("data:image/png;base64,@@not base64@@")
    assert e.value.reason == "undecodable_image"


def test_messages_end_to_end_counts_rejects_and_images(samples, tiny_tokenizer, tmp_path):
    root, files = samples
    cfg = PreprocessConfig(
        inputs=[str(root / "ms_swift.jsonl"), str(root / "openai_chat.jsonl")],
        output_prefix=str(tmp_path / "out"),
        tokenizer=tiny_tokenizer,
        tiling=TILING,
        packing=PackingConfig(seq_length=512, packing_buffer=16, seed=1),
        max_reject_rate=0.5,
    )
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0, summary
    assert summary["rejects"] == {"remote_url": 1}
    assert summary["samples"] == 7 and summary["images"] == 5 + 8  # + the ms-swift clip's 8 frames


def meta_args(tokenizer, out, meta="shell/data/shapes_meta.json"):
    return [
        "--input",
        meta,
        "--tokenizer",
        tokenizer,
        "--output-prefix",
        str(out),
        "--seq-length",
        "256",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--max-tiles",
        "4",
        "--packing-buffer",
        "8",
    ]


@pytest.fixture
def internvl_tree(tmp_path, monkeypatch):
    """InternVL's layout: run from internvl_chat/, meta under shell/data/, data under playground/."""
    root = tmp_path / "internvl_chat"
    shutil.copytree(os.path.join(SAMPLES, "internvl_meta"), root)
    write_images(root / "playground" / "data" / "shapes")
    monkeypatch.chdir(root)
    return root


def test_internvl_meta_builds_one_dataset_per_entry_and_the_blend(
    internvl_tree, tiny_tokenizer, tmp_path, capsys
):
    from megatron_sail.data.loading.dataset import PackedDataset, build_blended

    out = tmp_path / "packed"
    assert preprocess_data.main(meta_args(tiny_tokenizer, out)) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line.get("dataset") for line in lines[:2]] == ["shapes_caption", "shapes_vqa"]
    assert "shapes_vqa: data_augment is not applied" in captured.err
    a, b = (PackedDataset(str(out / n)) for n in ("shapes_caption", "shapes_vqa"))
    meta_a = json.loads((out / "shapes_caption.meta.json").read_text())
    meta_b = json.loads((out / "shapes_vqa.meta.json").read_text())
    assert meta_a["tiling"]["max_tiles"] == 1 and meta_b["tiling"]["max_tiles"] == 4
    grids_a = np.load(out / "shapes_caption.images_meta.npy")[:, :2]
    grids_b = np.load(out / "shapes_vqa.images_meta.npy")[:, :2]
    assert (grids_a.prod(axis=1) == 1).all() and (grids_b.prod(axis=1) > 1).any()
    assert lines[0]["samples"] == 3 and lines[1]["samples"] == 4 and lines[1]["images"] == 4
    blend_doc = json.loads((out / "blend.json").read_text())
    ra, rb = 2 * len(a), 0.5 * len(b)
    want = [round(ra / (ra + rb), 6), round(rb / (ra + rb), 6)]
    assert [d["weight"] for d in blend_doc["datasets"]] == want
    data_path = (out / "data_path.txt").read_text().strip()
    assert (
        data_path
        == lines[2]["data_path"]
        == f"{want[0]} {out / 'shapes_caption'} {want[1]} {out / 'shapes_vqa'}"
    )
    blended = build_blended(data_path, seed=3)
    drawn = [blended.locate(k)[0] for k in range(1000)]
    assert abs(drawn.count(0) / 1000 - want[0]) < 0.01


def test_internvl_meta_failures_write_no_blend(internvl_tree, tiny_tokenizer, tmp_path, capsys):
    meta = json.loads((internvl_tree / "shell/data/shapes_meta.json").read_text())
    meta["shapes_vqa"]["annotation"] = "playground/opensource/missing.jsonl"
    meta["shapes_caption"]["max_num_frame"] = 32
    (internvl_tree / "broken.json").write_text(json.dumps(meta))
    out = tmp_path / "packed"
    assert preprocess_data.main(meta_args(tiny_tokenizer, out, "broken.json")) == 1
    captured = capsys.readouterr()
    assert "shapes_caption: keys not used here: max_num_frame" in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["dataset"] == "shapes_caption" and "error" not in lines[0]
    assert "missing.jsonl" in lines[1]["error"] and "shapes_vqa" in lines[2]["error"]
    assert not (out / "blend.json").exists() and not (out / "data_path.txt").exists()
    meta["shapes_vqa"]["repeat_time"] = 0
    (internvl_tree / "zero.json").write_text(json.dumps(meta))
    assert preprocess_data.main(meta_args(tiny_tokenizer, out, "zero.json")) == 2
    assert "repeat_time must be a number > 0" in capsys.readouterr().err
