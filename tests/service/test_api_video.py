"""Video through the HTTP API of a real server: /embed, vLLM's video_url in /v1/embeddings,
every bad video's 4xx, video URLs under the image allow-list rules, limits in /info, and a
clip as a collection document found by its caption."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tests.model.test_video import BAD
from tests.videos import bad_videos, make_clip

CLIP = make_clip(40, 24, 96, 64)  # 5 frames kept (every 8th)
CLIP_B64 = base64.b64encode(CLIP).decode()
VIDEO_TEXT = "Represent the given video."


def _embed(server, inputs, **kw):
    with server.client() as c:
        return c.post("/embed", json={"inputs": inputs, **kw})


def test_a_clip_embeds_as_the_model_core_does(server, tiny_embedder):
    caption = {"text": "Find me an video that matches the given caption: a square moves"}
    inputs = [
        {"video": CLIP_B64, "text": VIDEO_TEXT},
        caption,
        {
            "content": [
                {"type": "video", "video": "data:video/mp4;base64," + CLIP_B64},
                {"type": "text", "text": "x"},
            ]
        },
    ]
    raw = [
        {"video": CLIP, "text": VIDEO_TEXT},
        caption,
        {"content": [{"type": "video", "video": CLIP}, {"type": "text", "text": "x"}]},
    ]
    r = _embed(server, inputs)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(got, tiny_embedder.embed(raw), atol=1e-5)
    usage = r.json()["usage"]
    assert usage["videos"] == 2 and usage["images"] == 0
    assert usage["prompt_tokens"] == sum(len(tiny_embedder.preprocess(x).input_ids) for x in raw)
    # 5 frames kept, each 4x4 features pooled to 2x2 with a newline per row: 6 tokens a frame
    assert tiny_embedder.preprocess(raw[0]).input_ids.count(tiny_embedder.image_token_id) == 5 * 6


def test_vllm_video_url_part_equals_the_content_form(server):
    message = {
        "role": "user",
        "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + CLIP_B64}},
            {"type": "text", "text": VIDEO_TEXT},
        ],
    }
    with server.client() as c:
        chat = c.post("/v1/embeddings", json={"messages": [message]})
        content = c.post(
            "/embed",
            json={
                "inputs": [
                    {"content": [{"type": "video", "video": CLIP_B64}, {"type": "text", "text": VIDEO_TEXT}]}
                ]
            },
        )
    assert chat.status_code == 200, chat.text
    np.testing.assert_allclose(
        chat.json()["data"][0]["embedding"], content.json()["embeddings"][0], atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_video_gets_a_4xx_that_names_it(server, name):
    status = 413 if BAD[name][0].__name__ == "VideoTooLargeError" else 422
    r = _embed(server, [{"text": "fine"}, {"video": base64.b64encode(BAD_VIDEOS[name]).decode()}])
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert BAD[name][1] in error["message"] and "input 1" in error["message"]


BAD_VIDEOS = bad_videos()


def test_video_shapes_are_checked(server):
    both = _embed(server, [{"image": "aGVsbG8=", "video": CLIP_B64}])
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
    two = _embed(
        server, [{"content": [{"type": "video", "video": CLIP_B64}, {"type": "video", "video": CLIP_B64}]}]
    )
    assert two.status_code == 413 and "2 videos" in two.json()["error"]["message"]
    url = _embed(server, [{"video": "https://videos.example.com/clip.mp4"}])
    assert url.status_code == 422 and "video URLs are not accepted" in url.json()["error"]["message"]


def test_info_reports_the_video_limits(server):
    with server.client() as c:
        limits = c.get("/info").json()["limits"]
    assert limits["max_video_seconds"] == 600 and limits["video_max_tokens"] == 8192
    assert limits["max_videos_per_input"] == 1 and limits["max_video_frame_pixels"] == 3840 * 2160


class _Clips(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = CLIP if self.path == "/clip.mp4" else CLIP * 3
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_video_urls_follow_the_image_url_rules(tiny_checkpoint, tmp_path, tiny_embedder):
    import asyncio

    from service.inference.images import ImageFetcher

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Clips)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{httpd.server_address[1]}"
    fetcher = ImageFetcher(["127.0.0.1"], allow_private=True, max_bytes=16, video_max_bytes=len(CLIP) + 1)

    async def go(inputs):
        try:
            return await fetcher.resolve_inputs(inputs)
        finally:
            await fetcher.aclose()

    try:
        out = asyncio.run(go([{"content": [{"type": "video", "video": host + "/clip.mp4"}]}]))
        assert out[0]["content"][0]["video"] == CLIP  # the video cap, not the image's 16 bytes
        with pytest.raises(Exception, match="video at the URL is larger") as exc:
            asyncio.run(go([{"text": "a"}, {"video": host + "/big.mp4"}]))
        assert type(exc.value).__name__ == "VideoTooLargeError" and exc.value.input_index == 1
        closed = ImageFetcher(["videos.example.com"], allow_private=True)
        with pytest.raises(Exception, match="video URLs from host '127.0.0.1' are not allowed"):
            asyncio.run(closed.resolve_inputs([{"video": host + "/clip.mp4"}]))
    finally:
        httpd.shutdown()


def test_a_clip_document_keeps_its_first_frame_and_duration_and_finds_itself(server, tiny_embedder):
    clip = make_clip(30, 15, 64, 48)
    clip_b64 = base64.b64encode(clip).decode()
    with server.client() as c:
        r = c.post(
            "/collections/clips/documents",
            json={
                "documents": [
                    {"id": "clip-1", "video": clip_b64, "text": VIDEO_TEXT, "metadata": {"kind": "clip"}},
                    {"id": "note", "text": "a note about something else"},
                ]
            },
        )
        assert r.status_code == 200, r.text
        doc = c.get("/collections/clips/documents/clip-1", params={"with_vector": True}).json()
        assert doc["thumbnails"] == 1 and doc["text"] == VIDEO_TEXT
        assert doc["videos"] == [{"thumbnail": 0, "seconds": pytest.approx(2.0, abs=0.07)}]
        expected = tiny_embedder.embed([{"video": clip, "text": VIDEO_TEXT}])[0]
        np.testing.assert_allclose(doc["vector"], expected, atol=1e-5)
        thumb = c.get("/collections/clips/documents/clip-1/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        _assert_first_frame(thumb.content, clip)
        hits = c.post(
            "/search",
            json={
                "collection": "clips",
                "query": {"video": clip_b64, "text": VIDEO_TEXT},
                "k": 2,
                "include": ["thumbnail"],
            },
        ).json()["hits"]
    assert hits[0]["id"] == "clip-1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["thumbnail"].startswith("data:image/webp;base64,")
    assert hits[0]["video_seconds"] == pytest.approx(2.0, abs=0.07) and "video_seconds" not in hits[1]


def _assert_first_frame(webp: bytes, clip: bytes) -> None:
    """The thumbnail shows the clip's first frame (decoded here by PyAV on its own)."""
    import io

    import av
    from PIL import Image

    with av.open(io.BytesIO(clip)) as container:
        first = next(container.decode(video=0)).to_image()
    shown = Image.open(io.BytesIO(webp)).convert("RGB")
    assert shown.size == first.size  # 64x48: smaller than the thumbnail size, not enlarged
    diff = np.abs(np.asarray(shown, dtype=np.int16) - np.asarray(first, dtype=np.int16))
    assert diff.mean() < 6  # lossy WebP of the same picture (another frame differs by far more)


def test_ingest_takes_video_files(server, tmp_path):
    import json
    import subprocess
    import sys

    from tests.service.conftest import REPO

    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(make_clip(24, 24, 64, 48))
    (folder / "clip.webm").write_bytes(make_clip(12, 12, 48, 48, codec="libvpx-vp9", container="webm"))
    (folder / "readme.txt").write_text("not media")
    cmd = [
        sys.executable,
        "-m",
        "service.ingest",
        "--collection",
        "media",
        str(folder),
        "--server",
        server.url,
    ]
    out = subprocess.run([*cmd, "--no-progress"], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["added"] == 2
    with server.client() as c:
        doc = c.get("/collections/media/documents/clip.webm").json()
    assert doc["metadata"] == {"path": "clip.webm"} and doc["text"] == VIDEO_TEXT
    assert doc["videos"] == [{"thumbnail": 0, "seconds": pytest.approx(1.0, abs=0.1)}]
