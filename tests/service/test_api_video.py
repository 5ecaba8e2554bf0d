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
