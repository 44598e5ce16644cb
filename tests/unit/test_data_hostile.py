"""Hostile input for tools/preprocess_data.py: every bad record is a reject with its reason, source
and line (never a crash, hang or read outside the image root), with 1 or 2 workers."""

import filecmp
import io
import json
import os
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from megatron_sail.config.data import PackingConfig, PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data import indexed
from megatron_sail.data.loading.dataset import PackedDataset
from megatron_sail.data.preprocess.pipeline import run

TILING = TilingConfig(tile_size=32, min_tiles=1, max_tiles=4, thumbnail=True, tokens_per_tile=4)
CONV = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]


def config(tokenizer, inputs, prefix, **kw):
    return PreprocessConfig(
        inputs=[str(p) for p in inputs],
        output_prefix=str(prefix),
        tokenizer=tokenizer,
        tiling=TILING,
        packing=kw.pop("packing", PackingConfig(256, 4, 7)),
        max_reject_rate=1.0,
        **kw,
    )


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header claims w x h."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def bmp_claiming(w: int, h: int) -> bytes:
    """A 54-byte BMP header claiming w x h, 24 bit (PIL: DecompressionBombError at open)."""
    return (
        b"BM"
        + struct.pack("<IHHI", 54, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)
    )


def png(path, size=(64, 64), colour=(1, 2, 3)):
    Image.new("RGB", size, colour).save(path, format="PNG")


@pytest.fixture
def hostile(tmp_path):
    """root/ with good and hostile images, outside/ with a secret; a JSONL naming them all.

    Returns (jsonl, root, {line number: (reason, text the detail must contain)}, good count).
    """
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    png(root / "good.png")
    png(outside / "secret.png", colour=(9, 9, 9))
    (root / "bomb.bmp").write_bytes(bmp_claiming(30000, 30000))
    (root / "claim.png").write_bytes(png_claiming(20000, 20000))
    (root / "big.png").write_bytes(png_claiming(12000, 12000))
    (root / "garbage.png").write_bytes(b"\x00not an image")
    (root / "cut.png").write_bytes((root / "good.png").read_bytes()[:-20])
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(root / "good.png", root / "sub" / "inner_link.png")  # a symlink within the root is fine
    rec = lambda image: json.dumps({"image": image, "conversations": CONV}).encode()  # noqa: E731
    good = rec("good.png")
    lines = [
        (good, None),
        (rec("bomb.bmp"), ("image_too_large", "bomb.bmp")),
        (rec("claim.png"), ("image_too_large", "claim.png: 20000x20000")),
        (rec("big.png"), ("image_too_large", "big.png: 12000x12000")),
        (
            b'{"conversations": [{"from": "human", "value": "hi \\ud800"}, {"from": "gpt", "value": "x"}]}',
            ("bad_encoding", "lone surrogate U+D800"),
        ),
        (
            b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}',
            ("bad_encoding", "invalid UTF-8 byte 0xe9"),
        ),
        (rec("/dev/zero"), ("path_outside_root", "/dev/zero")),
        (rec("fifo.png"), ("not_a_regular_file", "fifo.png is a FIFO")),
        (rec("sub"), ("not_a_regular_file", "sub is a directory")),
        (rec("../outside/secret.png"), ("path_outside_root", "outside the image root")),
        (rec(str(outside / "secret.png")), ("path_outside_root", "absolute image paths are refused")),
        (rec("link.png"), ("path_outside_root", "secret.png")),
        (rec("garbage.png"), ("undecodable_image", "garbage.png")),
        (rec("cut.png"), ("truncated_image", "cut.png")),
        (rec("sub/inner_link.png"), None),
        (good, None),
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    expected = {i + 1: want for i, (_, want) in enumerate(lines) if want}
    return path, root, expected, sum(want is None for _, want in lines)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_hostile_record_is_a_reject_with_reason_source_and_line(
    tiny_tokenizer, hostile, tmp_path, workers
):
    path, root, expected, n_good = hostile
    cfg = config(tiny_tokenizer, [path], tmp_path / "out", image_root=str(root), workers=workers)
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0, summary
    assert summary["samples"] == n_good and summary["images"] == n_good
    lines = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "out"))]
    got = {int(x["key"].split()[1]): x for x in lines}
    assert sorted(got) == sorted(expected)
    for line, (reason, text) in expected.items():
        assert got[line]["reason"] == reason and text in got[line]["detail"], got[line]
        assert got[line]["source"] == str(path)
    # nothing from outside the root reached the packed images
    ds = PackedDataset(str(tmp_path / "out"))
    stored = {im.data for i in range(len(ds)) for im in ds[i].images}
    assert stored == {(root / "good.png").read_bytes()}


def test_rejects_are_byte_identical_across_runs_and_workers_and_name_the_image(
    tiny_tokenizer, hostile, tmp_path
):
    path, root, _, _ = hostile
    outs = []
    for k, workers in enumerate([1, 1, 2]):
        cfg = config(tiny_tokenizer, [path], tmp_path / f"r{k}", image_root=str(root), workers=workers)
        assert run(cfg, log=lambda m: None)[0] == 0
        outs.append(f"{tmp_path}/r{k}.rejects.jsonl")
    assert filecmp.cmp(outs[0], outs[1], shallow=False) and filecmp.cmp(outs[0], outs[2], shallow=False)
    text = open(outs[0], encoding="utf-8").read()
    assert " at 0x" not in text and "object" not in text
    garbage = next(json.loads(x) for x in text.splitlines() if "garbage" in x)
    assert garbage["detail"] == f"{root / 'garbage.png'}: not a known image format"


def test_allow_absolute_paths_reads_them_but_still_only_regular_files(tiny_tokenizer, tmp_path):
    png(tmp_path / "abs.png")
    lines = [
        {"image": str(tmp_path / "abs.png"), "conversations": CONV},
        {"image": "/dev/zero", "conversations": CONV},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "root").mkdir()
    cfg = config(
        tiny_tokenizer,
        [tmp_path / "a.jsonl"],
        tmp_path / "o",
        image_root=str(tmp_path / "root"),
        allow_absolute_paths=True,
    )
    code, summary = run(cfg, log=lambda m: None)
    assert code == 0 and summary["images"] == 1 and summary["rejects"] == {"not_a_regular_file": 1}
    (line,) = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o"))]
    assert line["detail"] == "/dev/zero is a character device" and line["key"] == "line 2"


def test_size_cap_and_pixel_limit_flags(tiny_tokenizer, tmp_path):
    png(tmp_path / "a.png", size=(64, 64))
    png(tmp_path / "b.png", size=(64, 32))
    lines = [{"image": "a.png", "conversations": CONV}, {"image": "b.png", "conversations": CONV}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    size_a = os.path.getsize(tmp_path / "a.png")
    code, s = run(
        config(tiny_tokenizer, [tmp_path / "a.jsonl"], tmp_path / "o1", max_image_pixels=64 * 63),
        log=lambda m: None,
    )
    assert code == 0 and s["rejects"] == {"image_too_large": 1} and s["images"] == 1
    (line,) = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o1"))]
    assert line["key"] == "line 1" and "a.png: 64x64 = 4096 pixels > limit 4032" in line["detail"]
    code, s = run(
        config(tiny_tokenizer, [tmp_path / "a.jsonl"], tmp_path / "o2", max_image_bytes=size_a - 1),
        log=lambda m: None,
    )
    small = os.path.getsize(tmp_path / "b.png") < size_a
    assert code == 0 and s["rejects"] == {"file_too_large": 1 + (not small)}
    assert f"{size_a} bytes > --max-image-bytes {size_a - 1}" in indexed.read_rejects(str(tmp_path / "o2"))[0]


def test_cli_flags_and_a_non_utf8_line_is_not_exit_2(tiny_tokenizer, tmp_path, capsys):
    """Before: 'error: utf-8 codec can't decode' and rc 2, no file or line named, no dataset."""
    import preprocess_data as cli

    good = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]})
    (tmp_path / "d.jsonl").write_bytes((good + "\n").encode() * 30 + b'{"text": "\xff"}\n')
    args = [
        "--input",
        str(tmp_path / "d.jsonl"),
        "--tokenizer",
        tiny_tokenizer,
        "--seq-length",
        "128",
        "--tile-size",
        "32",
        "--tokens-per-tile",
        "4",
        "--output-prefix",
        str(tmp_path / "o"),
        "--max-image-pixels",
        "1000",
        "--max-image-bytes",
        "2000",
        "--allow-absolute-paths",
    ]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 30 and summary["rejects"] == {"bad_encoding": 1}
    (line,) = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o"))]
    assert (line["source"], line["key"]) == (str(tmp_path / "d.jsonl"), "line 31")
    cfg = cli.parse_args(args)
    assert (cfg.max_image_pixels, cfg.max_image_bytes, cfg.allow_absolute_paths) == (1000, 2000, True)
    with pytest.raises(SystemExit):
        cli.parse_args(args[:-5] + ["--max-image-pixels", "0"])


def test_json_array_with_a_bad_byte_rejects_only_that_item(tiny_tokenizer, tmp_path):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]}
    body = json.dumps([good, good]).encode()
    bad = b'{"conversations": [{"from": "human", "value": "\xc3("}, {"from": "gpt", "value": "x"}]}'
    (tmp_path / "a.json").write_bytes(body[:-1] + b", " + bad + b"]")
    code, s = run(config(tiny_tokenizer, [tmp_path / "a.json"], tmp_path / "o"), log=lambda m: None)
    assert code == 0 and s["samples"] == 2 and s["rejects"] == {"bad_encoding": 1}
    (line,) = [json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o"))]
    assert line["key"] == "item 2" and "invalid UTF-8 byte 0xc3" in line["detail"]


def test_webdataset_oversized_member_and_bad_caption_bytes(tiny_tokenizer, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    members = [
        ("a.png", buf.getvalue()),
        ("a.txt", b"red"),
        ("b.png", buf.getvalue()),
        ("b.txt", b"r\xffd"),
        ("c.png", buf.getvalue() + b"\x00" * 5000),
        ("c.txt", b"big"),
    ]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = config(
        tiny_tokenizer, [tmp_path / "s.tar"], tmp_path / "o", max_image_bytes=len(buf.getvalue()) + 100
    )
    code, s = run(cfg, log=lambda m: None)
    assert code == 0 and s["samples"] == 1 and s["rejects"] == {"bad_encoding": 1, "file_too_large": 1}
    lines = {json.loads(x)["key"]: json.loads(x) for x in indexed.read_rejects(str(tmp_path / "o"))}
    assert "b.txt" in lines["b"]["detail"] and "member c.png is" in lines["c"]["detail"]


def test_an_unexpected_error_in_a_worker_is_a_reject_not_a_dead_pool(tiny_tokenizer, tmp_path, monkeypatch):
    """Any exception a record triggers (here a TypeError from the tokenizer) is counted as
    'unexpected_error' with its message; the other samples of every block are kept."""
    from megatron_sail.data import template

    real = template.ChatTemplate.render

    def render(self, turns, image_tokens):
        if any("poison" in text for _, text in turns):
            raise TypeError("TextInputSequence must be str")
        return real(self, turns, image_tokens)

    monkeypatch.setattr(template.ChatTemplate, "render", render)
    ok = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [{"from": "human", "value": "poison"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps(bad if i % 5 == 2 else ok) + "\n" for i in range(20))
    )
    for workers in (1, 2):
        code, s = run(
            config(tiny_tokenizer, [tmp_path / "d.jsonl"], tmp_path / f"w{workers}", workers=workers),
            log=lambda m: None,
        )
        assert code == 0 and s["samples"] == 16 and s["rejects"] == {"unexpected_error": 4}
        first = json.loads(indexed.read_rejects(str(tmp_path / f"w{workers}"))[0])
        assert first["key"] == "line 3" and first["detail"] == "TypeError: TextInputSequence must be str"


def test_an_input_that_is_not_a_regular_file_is_refused_by_name(tmp_path):
    from megatron_sail.data.preprocess.formats import expand_inputs

    os.mkfifo(tmp_path / "in.jsonl")
    with pytest.raises(ValueError, match=r"in\.jsonl is not a regular file"):
        expand_inputs([str(tmp_path / "in.jsonl")])
    with pytest.raises(ValueError, match="/dev/zero is not a regular file"):
        expand_inputs(["/dev/zero"])


def test_a_reject_naming_a_non_utf8_tar_member_is_written_escaped(tiny_tokenizer, tmp_path):
    """tarfile decodes a member name with invalid UTF-8 to lone surrogates; the reject report
    must still be written (escaped), not crash the writer with a UnicodeEncodeError."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    with tarfile.open(
        tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name, data in [
            ("ok.png", buf.getvalue()),
            ("ok.txt", b"red"),
            ("b\udcff.png", b"junk"),
            ("b\udcff.txt", b"blue"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, s = run(config(tiny_tokenizer, [tmp_path / "s.tar"], tmp_path / "o"), log=lambda m: None)
    assert code == 0 and s["samples"] == 1 and s["rejects"] == {"undecodable_image": 1}
    raw = open(f"{tmp_path}/o.rejects.jsonl", "rb").read()
    line = json.loads(raw.decode("utf-8"))  # valid UTF-8; the escape reads back as the same name
    assert b"b\\udcff.png: " in raw and line["key"] == "b\udcff" and line["detail"].startswith("b\udcff.png")
