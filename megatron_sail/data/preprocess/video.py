"""InternVL-style video samples: a clip becomes N frames, one tile each, frame tokens in order.

InternVL's video records are LLaVA records with a ``video`` path and a ``<video>`` placeholder;
its loader samples N frames (the middle frame of N equal segments when not randomizing), turns
each into ONE tile (no dynamic tiling, no thumbnail) and replaces ``<video>`` with
``Frame1: <image>\\nFrame2: <image>\\n...``. We do the same once, offline: frames are decoded with
PyAV (FFmpeg), resized to tile x tile (bicubic; a square tile-sized image always gets the 1x1
grid) and stored as JPEG (quality 95) like any other image, so the trainer sees ordinary images.
Frame count is fixed per run (``--video-frames``; a shorter clip gives all its frames).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from megatron_sail.data.template import IMAGE_PLACEHOLDER, SampleError

VIDEO_PLACEHOLDER = "<video>"
JPEG_QUALITY = 95


class VideoClip(bytes):
    """The encoded bytes of a video file named by a record (expanded into frames later)."""

    path: str

    @classmethod
    def make(cls, data: bytes, path: str) -> "VideoClip":
        clip = cls(data)
        clip.path = path
        return clip


@dataclass(frozen=True)
class VideoConfig:
    """How video samples are turned into frames."""

    num_frames: int = 8
    """Frames sampled per clip (middle of equal segments); 0 rejects video samples."""
    frame_size: int = 448
    """Side of the square frame image (the tile size, so each frame is exactly one tile)."""


def segment_middles(total: int, num: int) -> list[int]:
    """Indices of the middle frame of ``num`` equal segments of ``total`` frames (all if fewer)."""
    num = min(num, total)
    bounds = [round(total * k / num) for k in range(num + 1)]
    return [(a + b) // 2 for a, b in zip(bounds[:-1], bounds[1:])]


def decode_frames(data: bytes, cfg: VideoConfig, where: str = "video") -> list[bytes]:
    """JPEG bytes of the sampled frames of an encoded clip, in time order."""
    try:
        import av
    except ImportError as e:  # pinned in requirements.txt; a clear reject if an image lacks it
        raise SampleError("video_unsupported", "PyAV (av) is not installed") from e
    from PIL import Image

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SampleError("undecodable_video", f"{where}: no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for _ in container.decode(stream))
        if total <= 0:
            raise SampleError("undecodable_video", f"{where}: no frames")
        wanted = segment_middles(total, cfg.num_frames)
        frames, last = [], wanted[-1]
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                while len(frames) < len(wanted) and wanted[len(frames)] == i:
                    frames.append(frame.to_image())
    except SampleError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise SampleError("undecodable_video", f"{where}: {e}") from e
    if len(frames) < len(wanted):
        raise SampleError(
            "truncated_video",
            f"{where}: {len(frames)} of {len(wanted)} frames decoded (the stream claims {total})",
        )
    out = []
    for image in frames:
        buf = io.BytesIO()
        image.convert("RGB").resize((cfg.frame_size, cfg.frame_size), Image.BICUBIC).save(
            buf, format="JPEG", quality=JPEG_QUALITY
        )
        out.append(buf.getvalue())
    return out


def expand_videos(turns: list[dict], blobs: list, cfg: VideoConfig) -> tuple[list[dict], list]:
    """Replace a record's video clip by its frames: ``<video>`` (or, without one, the start of
    the first user turn) becomes ``Frame1: <image>\\n...FrameN: <image>\\n``."""
    clips = [b for b in blobs if isinstance(b, VideoClip)]
    if not clips:
        return turns, blobs
    if len(clips) > 1 or len(blobs) > 1:
        raise SampleError("bad_sample", "a video sample holds exactly one video and no images")
    if cfg.num_frames <= 0:
        raise SampleError("video_unsupported", "video samples are off (--video-frames 0)")
    frames = decode_frames(clips[0], cfg, clips[0].path)
    tokens = "\n".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(len(frames))) + "\n"
    texts = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in turns]
    count = sum(t.count(VIDEO_PLACEHOLDER) for t in texts if isinstance(t, str))
    if count > 1:
        raise SampleError("placeholder_mismatch", f"{count} {VIDEO_PLACEHOLDER} placeholders, 1 video")
    out = []
    for turn, text in zip(turns, texts):
        if isinstance(text, str) and VIDEO_PLACEHOLDER in text:
            text = text.replace(VIDEO_PLACEHOLDER + "\n", tokens, 1).replace(VIDEO_PLACEHOLDER, tokens, 1)
            turn = {"from": turn.get("from", turn.get("role")), "value": text}
        out.append(turn)
    if count == 0:
        first = next(
            (
                i
                for i, t in enumerate(out)
                if isinstance(t, dict) and t.get("from", t.get("role")) in ("human", "user")
            ),
            None,
        )
        if first is None:
            raise SampleError("placeholder_mismatch", "a video but no user turn to put it in")
        t = out[first]
        out[first] = {
            "from": t.get("from", t.get("role")),
            "value": tokens + t.get("value", t.get("content", "")),
        }
    return out, frames
