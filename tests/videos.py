"""Video clips for tests, encoded with PyAV (FFmpeg's own encoders), as a user's file would be.

Every frame differs (a moving square over a gradient whose colour changes with the frame
number), so a wrong frame index changes the pixels.
"""

from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction

import av
import numpy as np


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = np.arange(width)[None, :] * 255 // max(width, 1)
    img[..., 1] = (i * 7) % 256
    img[..., 2] = np.arange(height)[:, None] * 255 // max(height, 1)
    side = max(2, min(width, height) // 4)
    x = (i * 3) % max(1, width - side)
    img[height // 3 : height // 3 + side, x : x + side] = (255, 255, 0)
    return img


def make_clip(
    frames: int,
    fps: float | Fraction = 24,
    width: int = 64,
    height: int = 48,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
    faststart: bool = False,
    audio_only_frames: int = 0,
    encoder_options: dict[str, str] | None = None,
) -> bytes:
    """Encode ``frames`` frames at ``fps`` and return the file's bytes.

    ``audio_only_frames`` > 0 with ``frames`` = 0 writes a file whose video stream is
    declared but holds no packet (the muxer writes its header with the first audio packet).
    """
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip." + container)
        options = {"movflags": "faststart"} if faststart else {}
        out = av.open(path, "w", format=container, options=options)
        stream = out.add_stream(codec, rate=rate, options=encoder_options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        audio = out.add_stream("aac", rate=8000) if audio_only_frames else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio is not None:
            for i in range(audio_only_frames):
                samples = np.zeros((1, 1024), np.float32)
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 8000, i * 1024
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)
        out.close()
        with open(path, "rb") as f:
            return f.read()


def bad_videos() -> dict[str, bytes]:
    """One file per way a video can be refused (the issue's list), by name."""
    good = make_clip(24, 24)
    fast = make_clip(24, 24, faststart=True)
    return {
        "not_a_video": io.BytesIO(b"GIF89a" + bytes(200)).getvalue(),
        "text": b"this is plain text, not a video file" * 4,
        "truncated_index": good[: len(good) // 2],  # the MP4 index (moov) is at the end: cut off
        "truncated_frames": fast[: int(len(fast) * 0.6)],  # index first, frame data cut off
        "zero_frames": make_clip(0, 24, container="matroska", audio_only_frames=4),
        "unsupported_codec": make_clip(3, 24, 32, 32, codec="ffv1", container="matroska"),
        "ten_hours": make_clip(4, Fraction(1, 9000), 32, 32),  # one frame every 2.5 hours
        "one_pixel": make_clip(3, 24, 1, 1, pix_fmt="yuv444p"),
        "sixteen_k_wide": make_clip(1, 24, 16384, 512, codec="mjpeg", container="avi", pix_fmt="yuvj420p"),
        "sixteen_k_sliver": make_clip(2, 24, 16384, 16),
    }
