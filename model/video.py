"""Decode a video the way the LLaVE authors do, with PyAV and within limits.

The authors' retrieval script reads a clip with decord (``llava/utils.py``,
``process_video_with_decord``): the clip has ``n`` frames (decord counts the packets of
the video stream and orders them by presentation time), frames are taken every
``round(avg_fps / 3)`` from frame 0, and when that gives more than 32 the indices become
``np.linspace(0, n - 1, 32, dtype=int)``. ``sample_indices`` is that rule.
``decode_video`` gives the same frames, pixel for pixel: decord converts to RGB with
FFmpeg's scaler at the frame's own size, as PyAV's ``to_ndarray("rgb24")`` does
(checked on H.264 and VP9 clips in MP4, WebM and Matroska; 4:2:0 8-bit, the format of
MSR-VTT and MSVD).

Decoding is lazy: the packets are read once without decoding (that gives ``n``, the
timestamps and the key frames), then each kept frame is decoded from its key frame, so
a long clip costs about one group of pictures per kept frame, never the whole stream.
Each kept frame is resized to the crop size as soon as it is decoded (bicubic, as the
authors' processor does), so memory holds one full-size frame at a time.

Limits (``VideoLimits``) are checked before the work they bound: bytes before opening,
container and codec (allow-lists: FFmpeg has many demuxers and decoders, few are
video formats people send), size and duration from the headers, the stream's packet
count while reading packets, and the pixels decoded while decoding.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import VideoDecodeError, VideoTooLargeError
from .inputs import payload_bytes

# The text after a clip when the LLaVE authors embed it for retrieval: their video message
# is ``<image>\nRepresent the given video.`` (CLIP4Clip's MSR-VTT and MSVD loaders).
VIDEO_TEXT = "Represent the given video."

# Containers recognised by their first bytes, and the FFmpeg demuxer each is opened with.
# Naming the demuxer keeps playlist formats (HLS, concat) that open other files or URLs
# out of reach whatever the bytes say.
CONTAINERS = ("MP4/MOV", "WebM/Matroska", "AVI", "MPEG-TS")
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
VIDEO_CODECS = (
    "h264",
    "hevc",
    "vp8",
    "vp9",
    "av1",
    "mpeg4",
    "msmpeg4v3",
    "mpeg1video",
    "mpeg2video",
    "mjpeg",
)


@dataclass(frozen=True, kw_only=True)
class VideoLimits:
    """Limits applied while reading one video (all configurable by the caller)."""

    max_bytes: int = 32 * 1024 * 1024  # encoded bytes
    max_seconds: float = 600.0  # duration from the headers (or the last timestamp)
    max_stream_frames: int = 36_000  # packets of the video stream (10 minutes at 60 fps)
    max_frame_pixels: int = 3840 * 2160  # width x height of the stream
    min_side: int = 16  # pixels; smaller streams hold nothing to embed
    max_aspect_ratio: float = 100.0
    max_decoded_pixels: int = 2_000_000_000  # all frames decoded to reach the kept ones
    max_videos: int = 1  # videos in one input


@dataclass(frozen=True, kw_only=True)
class FrameSampling:
    """The authors' frame sampling: ``fps`` frames a second, at most ``max_frames``."""

    fps: float = 3.0
    max_frames: int = 32


@dataclass
class VideoInfo:
    """What the headers and the packets say about a video stream (nothing decoded)."""

    frames: int  # decord's len(): packets of the video stream
    avg_fps: float
    width: int
    height: int
    seconds: float
    codec: str
    container: str


@dataclass
class DecodedVideo:
    """The kept frames of one video, resized to ``size`` x ``size`` RGB."""

    info: VideoInfo
    indices: list[int]
    frames: np.ndarray  # (n, size, size, 3) uint8
    poster: Image.Image  # the first kept frame at (at most) poster_side, for thumbnails
    decoded_frames: int = 0  # frames the decoder produced to reach the kept ones


def sample_indices(total: int, avg_fps: float, sampling: FrameSampling = FrameSampling()) -> list[int]:
    """The frame indices the authors' ``process_video_with_decord`` keeps.

    Python's ``round`` (half to even) as theirs; where their step would be 0 (a stream
    slower than 1.5 frames a second, which makes their ``range`` raise) the step is 1.
    """
    if total < 1:
        return []
    step = max(1, round(avg_fps / sampling.fps))
    indices = list(range(0, total, step))
    if sampling.max_frames > 0 and len(indices) > sampling.max_frames:
        indices = np.linspace(0, total - 1, sampling.max_frames, dtype=int).tolist()
    return indices


def video_bytes(value: Any, limits: VideoLimits) -> bytes:
    """Base64 text, a ``data:`` URI or bytes -> the video's bytes (size checked)."""
    return payload_bytes(value, limits.max_bytes, "video", VideoDecodeError, VideoTooLargeError)


def sniff_container(raw: bytes) -> tuple[str, str]:
    """(name for messages, FFmpeg demuxer) from the first bytes; refuses anything else."""
    if raw[4:8] in _MP4_BOXES:
        return "MP4/MOV", "mov"
    if raw[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska", "matroska"
    if raw[:4] == b"RIFF" and raw[8:12] == b"AVI ":
        return "AVI", "avi"
    if len(raw) > 376 and raw[0] == raw[188] == raw[376] == 0x47:
        return "MPEG-TS", "mpegts"
    raise VideoDecodeError(f"not a video: the data is none of the containers {', '.join(CONTAINERS)}")


def _rate(value: Any) -> float:
    try:
        rate = float(value) if value is not None else 0.0
    except (ZeroDivisionError, ValueError):
        return 0.0
    return rate if math.isfinite(rate) and rate > 0 else 0.0


class VideoReader:
    """One open container: headers checked, packets read, frames decoded on demand.

    ``open_video`` gives one with its packets read (``info`` set); close it (or use it
    as a context manager) when done."""

    def __init__(self, raw: bytes, limits: VideoLimits):
        import av  # imported here: text-only deployments never load FFmpeg

        self.av = av
        self.limits = limits
        self.container_name, demuxer = sniff_container(raw)
        try:
            self.container = av.open(io.BytesIO(raw), mode="r", format=demuxer)
        except av.FFmpegError as exc:
            raise VideoDecodeError(
                f"the {self.container_name} video could not be read (truncated or corrupt)"
            ) from exc
        try:
            self._check_stream()
        except BaseException:
            self.container.close()
            raise

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sample(self, sampling: FrameSampling = FrameSampling()) -> list[int]:
        """The indices of the frames the authors keep (``sample_indices``)."""
        return sample_indices(self.info.frames, self.info.avg_fps, sampling)

    def _check_stream(self) -> None:
        video = [s for s in self.container.streams if s.type == "video"]
        if not video:
            raise VideoDecodeError(f"the {self.container_name} file holds no video stream")
        try:
            self.stream = self.container.streams.best("video") or video[0]
        except self.av.FFmpegError:
            self.stream = video[0]
        context: Any = self.stream.codec_context  # a VideoCodecContext
        codec = context.name if context else None
        if codec not in VIDEO_CODECS:
            raise VideoDecodeError(
                f"unsupported video codec {codec or 'unknown'!s}; supported: {', '.join(VIDEO_CODECS)}"
            )
        self.codec = codec
        width, height = int(context.width), int(context.height)
        lim = self.limits
        if width < lim.min_side or height < lim.min_side:
            raise VideoDecodeError(
                f"the video is {width}x{height} pixels; each side must be at least {lim.min_side}"
            )
        if width * height > lim.max_frame_pixels:
            raise VideoTooLargeError(
                f"the video is {width}x{height} pixels a frame; the limit is {lim.max_frame_pixels} pixels"
            )
        if max(width, height) / min(width, height) > lim.max_aspect_ratio:
            raise VideoDecodeError(
                f"the video's aspect ratio {width}x{height} exceeds the limit of {lim.max_aspect_ratio:g}:1"
            )
        self.width, self.height = width, height
        self._check_seconds(self._header_seconds())

    def _header_seconds(self) -> float:
        stream = self.stream
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if self.container.duration is not None:
            return self.container.duration / 1_000_000
        return 0.0

    def _check_seconds(self, seconds: float) -> None:
        if seconds > self.limits.max_seconds:
            hours = f" ({seconds / 3600:.1f} hours)" if seconds >= 3600 else ""
            raise VideoTooLargeError(
                f"the video lasts {seconds:.0f} s{hours}; the limit is {self.limits.max_seconds:g} s"
            )

    def read_packets(self) -> None:
        """Read every packet of the stream once (no decoding): count, timestamps, keys."""
        packets = []
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker, not a frame
                    continue
                packets.append(packet)
                if len(packets) > self.limits.max_stream_frames:
                    raise VideoTooLargeError(
                        f"the video stream holds more than {self.limits.max_stream_frames} frames"
                    )
        except self.av.FFmpegError as exc:
            raise VideoDecodeError(
                f"the {self.container_name} video could not be read (truncated or corrupt)"
            ) from exc
        if not packets:
            raise VideoDecodeError("the video has no frames")
        listed = self.stream.frames or 0  # the container's own count (MP4's index), if any
        if len(packets) < listed:
            raise VideoDecodeError(
                f"the video is truncated: its index lists {listed} frames, the data holds {len(packets)}"
            )
        self.packets = packets
        given = [p.pts if p.pts is not None else p.dts for p in packets]
        self.timed = all(s is not None for s in given)
        stamps: list[int] = [int(s) for s in given] if self.timed else list(range(len(packets)))  # type: ignore[arg-type]
        self.stamps = stamps
        # decord's frame i is the packet with the i-th smallest presentation time
        self.frame_pts = sorted(stamps)
        self.keys = [i for i, p in enumerate(packets) if p.is_keyframe]
        rate = _rate(self.stream.average_rate) or _rate(self.stream.guessed_rate)
        seconds = self._header_seconds()
        if self.timed and self.stream.time_base is not None:
            span = float((max(stamps) - min(stamps)) * self.stream.time_base)
            seconds = max(seconds, span)
            self._check_seconds(seconds)
        if not rate:
            if seconds <= 0:
                raise VideoDecodeError("the video has no frame rate and no duration")
            rate = len(packets) / seconds
        self.info = VideoInfo(
            frames=len(packets),
            avg_fps=rate,
            width=self.width,
            height=self.height,
            seconds=seconds or len(packets) / rate,
            codec=self.codec,
            container=self.container_name,
        )

    def _start_packet(self, pts: int) -> int:
        """Index of the key frame (decode order) to decode from to reach ``pts``."""
        start = 0
        for k in self.keys:
            if self.stamps[k] <= pts:
                start = k
        return start

    def decode(self, indices: list[int], size: int, poster_side: int) -> DecodedVideo:
        """Decode the frames at ``indices`` (ascending), each resized to ``size``."""
        context: Any = self.stream.codec_context
        context.thread_count = 1  # memory stays one decoder's worth; the front ends run in parallel
        wanted: dict[int, list[int]] = {}  # pts -> positions in the output
        for pos, i in enumerate(indices):
            wanted.setdefault(self.frame_pts[i], []).append(pos)
        out = np.empty((len(indices), size, size, 3), np.uint8)
        got: set[int] = set()
        poster: Image.Image | None = None
        budget = self.limits.max_decoded_pixels
        decoded = 0
        next_packet: int | None = None
        frame_no = 0  # output order, used when packets carry no timestamps
        last_pts: int | None = None
        for index in indices:
            target = self.frame_pts[index]
            if target in got:
                continue
            start = self._start_packet(target)
            if next_packet is None or start >= next_packet or (last_pts is not None and last_pts >= target):
                context.flush_buffers()
                next_packet, frame_no, last_pts = start, start, None
            while target not in got:
                if next_packet > len(self.packets):  # drained and still missing
                    raise VideoDecodeError(
                        f"the video is truncated or corrupt: frame {index} of {len(self.packets)} could not be decoded"
                    )
                # past the last packet, None drains the frames the decoder still holds
                packet = self.packets[next_packet] if next_packet < len(self.packets) else None
                next_packet += 1
                try:
                    frames = context.decode(packet)
                except self.av.FFmpegError as exc:
                    raise VideoDecodeError("the video is corrupt: a frame could not be decoded") from exc
                for frame in frames:
                    stamp = frame.pts if self.timed else frame_no
                    frame_no += 1
                    decoded += 1
                    budget -= frame.width * frame.height
                    if budget < 0:
                        raise VideoTooLargeError(
                            f"decoding the sampled frames needs more than {self.limits.max_decoded_pixels} pixels "
                            "(too many frames between key frames)"
                        )
                    last_pts = stamp
                    if stamp in wanted and stamp not in got:
                        rgb = frame.to_ndarray(format="rgb24")
                        image = Image.fromarray(rgb)
                        if poster is None:
                            poster = image.copy()
                            poster.thumbnail((poster_side, poster_side), Image.Resampling.BICUBIC)
                        crop = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
                        out[wanted[stamp]] = crop
                        got.add(stamp)
                        del rgb, image, crop
        assert poster is not None
        return DecodedVideo(
            info=self.info, indices=indices, frames=out, poster=poster, decoded_frames=decoded
        )


def open_video(value: Any, limits: VideoLimits = VideoLimits()) -> VideoReader:
    """Open a video payload and read its packets (no frame decoded); limits checked."""
    reader = VideoReader(video_bytes(value, limits), limits)
    try:
        reader.read_packets()
    except BaseException:
        reader.close()
        raise
    return reader


def probe_video(value: Any, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Headers and packets only (no frame decoded): what the batcher's cost needs."""
    with open_video(value, limits) as reader:
        return reader.info


def decode_video(
    value: Any,
    limits: VideoLimits = VideoLimits(),
    *,
    size: int,
    sampling: FrameSampling = FrameSampling(),
    poster_side: int = 512,
) -> DecodedVideo:
    """Decode the frames the authors keep, each resized to ``size`` x ``size`` (bicubic)."""
    with open_video(value, limits) as reader:
        return reader.decode(reader.sample(sampling), size, poster_side)


def poster_frame(
    value: Any, limits: VideoLimits = VideoLimits(), *, side: int = 512
) -> tuple[Image.Image, VideoInfo]:
    """The first frame (at most ``side`` pixels a side) and the stream's facts, for a
    document's thumbnail: one frame decoded."""
    with open_video(value, limits) as reader:
        decoded = reader.decode([0], 16, side)
        return decoded.poster, reader.info


def frames_to_pixels(frames: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32: x / 255, then (x - mean) / std per
    channel, in the order and precisions of transformers' ``rescale`` and ``normalize``."""
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    normed = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normed.transpose(0, 3, 1, 2))
