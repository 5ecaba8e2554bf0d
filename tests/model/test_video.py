"""Video decoding: the authors' frame rule, lazy decoding that gives the frames a full
decode gives, every bad-video case, and the memory a decode takes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from model.errors import VideoDecodeError, VideoTooLargeError
from model.video import FrameSampling, VideoLimits, decode_video, probe_video, sample_indices
from tests.videos import bad_videos, make_clip


@pytest.mark.parametrize(
    ("total", "fps", "expected"),
    [
        (40, 24.0, [0, 8, 16, 24, 32]),  # below 32 kept frames: every round(24 / 3) = 8th
        (256, 24.0, list(range(0, 256, 8))),  # exactly 32: kept as they are
        (264, 24.0, np.linspace(0, 263, 32, dtype=int).tolist()),  # 33 -> resampled to 32
        (90, 29.97, list(range(0, 90, 10))),  # round(9.99) = 10
        (30, 7.5, list(range(0, 30, 2))),  # round(2.5) = 2: Python rounds half to even
        (30, 22.5, list(range(0, 30, 8))),  # round(7.5) = 8
        (5, 1.0, [0, 1, 2, 3, 4]),  # round(1 / 3) = 0: the authors' range() raises; step 1
        (0, 24.0, []),
    ],
)
def test_sample_indices_follow_the_authors_rule(total, fps, expected):
    assert sample_indices(total, fps) == expected


def test_sampling_is_configurable():
    assert sample_indices(100, 30.0, FrameSampling(fps=1.0, max_frames=4)) == [0, 30, 60, 90]
    assert sample_indices(100, 30.0, FrameSampling(fps=1.0, max_frames=3)) == [0, 49, 99]


def _full_decode(clip: bytes) -> list[np.ndarray]:
    """Every frame in presentation order, decoded front to back (no seeking)."""
    with av.open(__import__("io").BytesIO(clip)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize(
    ("frames", "fps", "kwargs"),
    [
        (40, 24, {}),  # 5 kept frames, one key frame (x264's default GOP), B-frames
        (300, 30, {"gop": 12}),  # 30 kept frames across 25 GOPs: lazy decoding skips most
        (99, Fraction(30000, 1001), {"gop": 10}),  # 10 kept frames (round(9.99) = 10)
        (264, 24, {"gop": 16}),  # 33 by the step -> 32 resampled by linspace
        (50, 25, {"codec": "libvpx-vp9", "container": "webm"}),  # no frame count in the header
        (60, 10, {"container": "matroska", "gop": 7}),
    ],
)
def test_lazy_decoding_gives_the_frames_of_a_full_decode(frames, fps, kwargs):
    clip = make_clip(frames, fps, **kwargs)
    size = 40
    video = decode_video(clip, size=size)
    every = _full_decode(clip)
    assert video.info.frames == len(every) == frames
    assert video.indices == sample_indices(frames, float(fps))
    expected = np.stack(
        [
            np.asarray(Image.fromarray(every[i]).resize((size, size), Image.Resampling.BICUBIC))
            for i in video.indices
        ]
    )
    assert video.frames.shape == (len(video.indices), size, size, 3)
    assert np.array_equal(video.frames, expected)
    if kwargs.get("gop", 250) < 20:
        assert video.decoded_frames < frames  # did seek: frames between kept ones were skipped
    assert video.poster.size == (64, 48)


def test_probe_reads_no_frame_and_reports_the_stream():
    info = probe_video(make_clip(30, 15, 80, 32))
    assert (info.frames, info.avg_fps, info.width, info.height, info.codec) == (30, 15.0, 80, 32, "h264")
    assert info.seconds == pytest.approx(2.0, abs=0.1)


BAD = {
    "not_a_video": (VideoDecodeError, "not a video"),
    "text": (VideoDecodeError, "not a video"),
    "truncated_index": (VideoDecodeError, "truncated"),
    "truncated_frames": (VideoDecodeError, "truncated"),
    "zero_frames": (VideoDecodeError, "no frames"),
    "unsupported_codec": (VideoDecodeError, "unsupported video codec ffv1"),
    "ten_hours": (VideoTooLargeError, "10.0 hours"),
    "one_pixel": (VideoDecodeError, "1x1 pixels"),
    "sixteen_k_wide": (VideoTooLargeError, "16384x512 pixels"),
    "sixteen_k_sliver": (VideoDecodeError, "aspect ratio 16384x16"),
}


@pytest.fixture(scope="module")
def bad():
    return bad_videos()


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_video_is_refused_by_name(bad, name):
    error, words = BAD[name]
    with pytest.raises(error, match=words):
        decode_video(bad[name], size=32)
    if name not in ("truncated_frames",):  # found while reading packets or headers
        with pytest.raises(error, match=words):
            probe_video(bad[name])


def test_limits_on_bytes_frames_and_decoded_pixels():
    clip = make_clip(60, 30, 64, 48)  # one GOP: every kept frame needs the frames before it
    with pytest.raises(VideoTooLargeError, match="bytes"):
        decode_video(clip, VideoLimits(max_bytes=len(clip) - 1), size=32)
    with pytest.raises(VideoTooLargeError, match="more than 59 frames"):
        decode_video(clip, VideoLimits(max_stream_frames=59), size=32)
    with pytest.raises(VideoTooLargeError, match="pixels"):
        decode_video(clip, VideoLimits(max_decoded_pixels=64 * 48 * 20), size=32)
    with pytest.raises(VideoDecodeError, match="valid base64"):
        decode_video("not base64 !", size=32)


_MEASURE = textwrap.dedent(
    """
    import sys
    from model.video import decode_video

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    small, clip = (open(p, "rb").read() for p in sys.argv[1:3])
    decode_video(small, size=384)  # libraries loaded and warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current size
    base = rss("VmRSS:")
    video = decode_video(clip, size=384)
    print(rss("VmHWM:") - base, video.decoded_frames)
    """
)


def test_decoding_memory_is_bounded_by_the_frame_size_not_the_length(tmp_path):
    """Peak memory of one decode, measured in a fresh process: the file and its packets,
    the decoder's reference frames, one full-size RGB frame and the kept 384px crops,
    whatever the clip's length (300 frames here, 32 kept)."""
    width, height = 640, 360
    clip = make_clip(300, 30, width, height, gop=30, encoder_options={"preset": "ultrafast"})
    (tmp_path / "small.mp4").write_bytes(make_clip(8, 24, 32, 32))
    (tmp_path / "clip.mp4").write_bytes(clip)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "small.mp4"), str(tmp_path / "clip.mp4")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    growth, decoded = int(out[0]), int(out[1])
    pixels = width * height
    bound = 2 * len(clip) + 17 * pixels * 3 // 2 + pixels * 3 + 32 * 384 * 384 * 3 + 16 * 2**20
    assert decoded > 32
    print(f"decoding grew the process by {growth / 2**20:.1f} MiB (bound {bound / 2**20:.1f})")
    assert growth < bound, (
        f"decoding grew the process by {growth / 2**20:.1f} MiB (bound {bound / 2**20:.1f})"
    )
