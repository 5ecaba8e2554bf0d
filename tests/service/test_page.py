"""The search page at ``/``, driven in a real headless Chromium (Debian's ``chromium``
package, through Playwright's Python package with ``executable_path``: nothing is
downloaded at test time; ``make test`` installs the browser as root).

The thumbnails' pixels are read back from screenshots of the displayed ``<img>`` elements.

The session's tiny model is random, so "a red circle" means nothing to it: the shapes
collection is chosen so that the expected answer is known independently. Every candidate
render and the query are embedded through ``/embed`` and ranked here with numpy; the
collection gets the red circles that rank best and only renders that rank below them.
The page must then show those red circles first: the test checks the text -> search ->
thumbnails path of the page and the server, not the model (the demo model's quality is
measured by ``service.demo``).

Screenshots go to the test's temporary directory; ``python -m tests.service.test_page
--model DEMO_MODEL --images DIR --out docs`` makes the README's from the trained demo model.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import API_KEY, start_server

CHROMIUM = (
    os.environ.get("LLAVE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
RED = (220, 30, 30)


def launch_browser(playwright):
    # --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root).
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras")
    if not CHROMIUM:
        pytest.skip("no chromium on PATH: `make test` installs it as root (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # bypass_csp: the page's Content-Security-Policy forbids eval, which wait_for_function uses.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def page_server(tiny_checkpoint, tmp_path_factory):
    srv = start_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("server-page"),
        "--max-inputs-per-request", "64",
        "--max-batch-size", "16",
        "--preprocess-workers", "2",
    )  # fmt: skip
    yield srv
    srv.stop()


# --- images --------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def renders(seed: int = 0, size: int = 64) -> list[tuple[str, bytes]]:
    """(name, PNG) for red circles and other shapes, drawn as the demo's data is."""
    from training.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, Scene, render

    rng = random.Random(seed)
    out = []
    for i in range(8):
        scene = Scene("red", "circle", SIZES[i % 2], POSITIONS[i % len(POSITIONS)])
        out.append((f"red-circle-{i}", png_bytes(render(scene, rng, size))))
    i = 0
    for colour in COLOURS:
        for shape in SHAPES:
            if colour == "red" and shape == "circle":
                continue
            scene = Scene(colour, shape, SIZES[i % 2], POSITIONS[i % len(POSITIONS)])
            out.append((f"{colour}-{shape}-{i}", png_bytes(render(scene, rng, size))))
            i += 1
    return out


def red_mask(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r > 150) & (g < 100) & (b < 100) & (r - g > 100)


def is_red_circle(image: Image.Image) -> bool:
    """Red pixels that fill a disc: the same-area disc at their centroid overlaps them with
    an IoU near 1 (a square scores about 0.83, other shapes lower)."""
    mask = red_mask(image)
    area = int(mask.sum())
    if area < 0.01 * mask.size:
        return False
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    radius = np.sqrt(area / np.pi)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    iou = (mask & disc).sum() / (mask | disc).sum()
    return bool(iou > 0.9)


def thumbnails(page) -> list[Image.Image]:
    images = []
    for card in page.locator("#results .card").all():
        thumb = card.locator("img.thumb")
        assert thumb.count() == 1, "a hit without a thumbnail"
        images.append(Image.open(io.BytesIO(thumb.screenshot())))
    return images


# --- tests ---------------------------------------------------------------------------------------


def test_shape_checks_tell_red_circles_apart():
    """The pixel checks used below can fail: they say no to every other render."""
    for name, data in renders(seed=1):
        assert is_red_circle(Image.open(io.BytesIO(data))) == name.startswith("red-circle"), name


def test_page_is_served_without_a_key_with_its_files(guarded_server):
    import httpx

    with httpx.Client(base_url=guarded_server.url, timeout=30) as client:
        for path, kind in (
            ("/", "text/html"),
            ("/page/app.js", "text/javascript"),
            ("/page/style.css", "text/css"),
        ):
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(kind)
        assert client.get("/page/secret.py").status_code == 401  # only the page's own files are open
        assert client.get("/collections").status_code == 401
        html = client.get("/").text
        assert "http://" not in html and "https://" not in html  # nothing from elsewhere: works offline


def test_a_red_circle_shows_red_circles_first(page_server, page, tmp_path):
    with page_server.client() as client:
        shapes = renders()
        texts = [{"text": "a red circle"}] + [{"image": base64.b64encode(d).decode()} for _, d in shapes]
        response = client.post("/embed", json={"inputs": texts})
        assert response.status_code == 200, response.text
        vectors = np.asarray(response.json()["embeddings"], dtype=np.float64)
        query, docs = vectors[0], vectors[1:]
        sims = docs @ query
        reds = sorted(
            (i for i, (n, _) in enumerate(shapes) if n.startswith("red-circle")), key=lambda i: -sims[i]
        )
        others = [i for i, (n, _) in enumerate(shapes) if not n.startswith("red-circle")]
        margin = 1e-3  # cosine similarities of unit vectors: well above float32 noise
        chosen = None
        for n in (3, 2, 1):
            floor = min(sims[i] for i in reds[:n])
            below = [i for i in others if sims[i] < floor - margin]
            if len(below) >= 6:
                chosen = (reds[:n], below[:9])
                break
        assert chosen is not None, "no red circle ranks above six other shapes for this model"
        red_ids, other_ids = chosen
        documents = [
            {"id": shapes[i][0], "image": base64.b64encode(shapes[i][1]).decode(), "metadata": {"i": int(i)}}
            for i in red_ids + other_ids
        ]
        response = client.post("/collections/shapes/documents", json={"documents": documents})
        assert response.status_code == 200, response.text

    page.goto(page_server.url + "/")
    page.locator("#collection").select_option("shapes")
    page.locator("#query-text").fill("a red circle")
    page.locator("#query-k").fill(str(len(red_ids) + 3))
    page.locator("#query-text").press("Enter")  # Enter searches
    page.locator("#results .card").nth(len(red_ids) + 2).wait_for()
    shown = thumbnails(page)
    ids = page.locator("#results .card").evaluate_all("cards => cards.map(c => c.dataset.id)")
    assert ids[: len(red_ids)] == [shapes[i][0] for i in red_ids]
    assert all(is_red_circle(image) for image in shown[: len(red_ids)]), ids
    assert not any(is_red_circle(image) for image in shown[len(red_ids) :]), ids
    page.screenshot(path=str(tmp_path / "search-page.png"))

    # Details open from the keyboard and Escape closes them, giving the focus back.
    first = page.locator("#results .card").first
    first.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#details")
    dialog.wait_for(state="visible")
    assert page.locator("#details-title").text_content() == shapes[red_ids[0]][0]
    assert '"i"' in page.locator("#details-metadata").text_content()
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.dataset.id") == shapes[red_ids[0]][0]


def test_upload_an_image_and_find_it(page_server, page, tmp_path):
    from training.synthetic import Scene, render

    image = render(Scene("purple", "star", "large", "center"), random.Random(7), 96)
    path = tmp_path / "purple star.png"
    image.save(path)
    page.goto(page_server.url + "/")
    page.locator("#upload-collection").fill("uploads")
    page.locator("#upload-files").set_input_files(str(path))
    page.locator("#upload-button").click()
    status = page.locator("#upload-status")
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('Added')")
    assert status.text_content().startswith("Added 1 of 1"), status.text_content()
    assert page.locator("#upload-progress").evaluate("p => p.value === p.max")
    assert page.locator("#message").is_hidden(), page.locator("#message").text_content()
    assert page.locator("#collection").input_value() == "uploads"

    page.locator("#query-file").set_input_files(str(path))  # the query image (drop zone's chooser)
    page.locator("#query-preview").wait_for(state="visible")
    page.locator("#search-button").click()
    first = page.locator("#results .card").first
    first.wait_for()
    assert first.get_attribute("data-id") == "purple star.png"
    score = float(first.locator(".score").text_content())
    assert score > 0.999  # the same image: cosine 1 up to float32 rounding and 3 printed digits
    shown = np.asarray(thumbnails(page)[0].convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    original = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    assert np.all(np.abs(shown - original) <= 0.05 * 255), (shown, original)

    # A file that is not an image: the server's 422 is shown as a message, nothing is added.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    page.locator("#upload-files").set_input_files(str(broken))
    page.locator("#upload-button").click()
    message = page.locator("#message")
    message.wait_for(state="visible")
    assert "broken.png" in message.text_content() and "422 invalid_input" in message.text_content()
    assert status.text_content().startswith("Added 0 of 1")
    assert page.locator("#collection option:checked").text_content() == "uploads (1)"


def test_add_a_video_and_find_it_by_dropping_the_clip(page_server, page, tmp_path):
    """A clip uploaded through the page is stored with its first frame and its length; dropping
    the same clip on the query zone finds it first, shown with its duration."""
    from tests.videos import make_clip

    clip = make_clip(36, 12, 64, 64)  # 3 s; every 4th frame kept
    path = tmp_path / "moving square.mp4"
    path.write_bytes(clip)
    from training.synthetic import Scene, render

    other = tmp_path / "teal square.png"
    render(Scene("green", "square", "large", "center"), random.Random(3), 80).save(other)
    page.goto(page_server.url + "/")
    page.locator("#upload-collection").fill("videos")
    page.locator("#upload-files").set_input_files([str(path), str(other)])
    page.locator("#upload-button").click()
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('Added')")
    assert page.locator("#upload-status").text_content().startswith("Added 2 of 2")
    assert page.locator("#message").is_hidden(), page.locator("#message").text_content()

    # Drop the clip as a browser delivers a dropped file: a drop event carrying it.
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: "video/mp4" }));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""",
        [base64.b64encode(clip).decode(), path.name],
    )
    page.locator("#query-video-preview").wait_for(state="visible")
    assert page.locator("#drop-hint").text_content() == path.name
    page.locator("#search-button").click()
    first = page.locator("#results .card").first
    first.wait_for()
    assert first.get_attribute("data-id") == path.name
    assert float(first.locator(".score").text_content()) > 0.999  # the same clip
    assert first.locator(".duration").text_content() == "▶ 0:03"
    assert "video of 0:03" in first.get_attribute("aria-label")
    assert page.locator("#results .card").nth(1).locator(".duration").count() == 0  # the image
    # The thumbnail is the clip's first frame (decoded here by PyAV on its own).
    import av

    shown_image = thumbnails(page)[0].convert("RGB")
    with av.open(io.BytesIO(clip)) as container:
        frame0 = next(container.decode(video=0)).to_image().resize(shown_image.size)
    # the bottom half: the duration badge covers a corner of the top
    half = shown_image.size[1] // 2
    shown = np.asarray(shown_image, dtype=np.float64)[half:]
    expected = np.asarray(frame0, dtype=np.float64)[half:]
    assert np.abs(shown - expected).mean() <= 0.05 * 255

    first.click()
    page.locator("#details-video").wait_for(state="visible")
    assert page.locator("#details-video").text_content() == "Video (3.0 s); the picture is its first frame."
    page.screenshot(path=str(tmp_path / "video-search.png"))


def test_a_wrong_api_key_shows_a_message_and_the_right_one_works(guarded_server, page, tmp_path):
    page.goto(guarded_server.url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")  # the first request got 401: the page asks for the key
    page.locator("#key-input").fill("not-the-key")
    page.locator("#key-input").press("Enter")
    page.wait_for_function("document.getElementById('key-reason').textContent.includes('refused')")
    assert dialog.is_visible()
    reason = page.locator("#key-reason").text_content()
    assert "missing or invalid API key" in reason  # the server's own message
    page.screenshot(path=str(tmp_path / "wrong-key.png"))
    page.get_by_role("button", name="Cancel").click()
    message = page.locator("#message")
    message.wait_for(state="visible")
    assert "API key" in message.text_content() and "401" in message.text_content()
    assert page.evaluate("sessionStorage.getItem('llave-api-key')") is None

    page.locator("#change-key").click()
    page.locator("#key-input").fill(API_KEY)
    page.locator("#key-input").press("Enter")
    page.wait_for_function("document.getElementById('message').hidden")
    assert page.evaluate("sessionStorage.getItem('llave-api-key')") == API_KEY
    page.reload()  # kept for the session: not asked again
    page.wait_for_function("document.activeElement && document.activeElement.id === 'query-text'")
    assert dialog.is_hidden()


def test_the_trained_demo_model_shows_red_circles_first(browser, tmp_path):
    """The real thing, when a prepared demo is at hand: ``LLAVE_TEST_DEMO_DIR`` names a
    ``service.demo`` cache (``.cache/demo`` after ``make serve``). Training one takes
    minutes, too long for every run of the suite."""
    demo = os.environ.get("LLAVE_TEST_DEMO_DIR")
    if not demo or not (Path(demo) / "model.done.json").is_file():
        pytest.skip("set LLAVE_TEST_DEMO_DIR to a prepared demo cache (.cache/demo after `make serve`)")
    srv = start_server(Path(demo) / "model", tmp_path, "--max-inputs-per-request", "32")
    try:
        index_demo_images(srv, Path(demo) / "data" / "images" / "eval")
        context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        page = context.new_page()
        page.goto(srv.url + "/")
        page.locator("#collection").select_option("demo")
        page.locator("#query-text").fill("a red circle")
        page.locator("#query-text").press("Enter")
        page.locator("#results .card").nth(2).wait_for()
        shown = thumbnails(page)[:3]
        ids = page.locator("#results .card").evaluate_all("cards => cards.map(c => c.dataset.id)")[:3]
        assert all(is_red_circle(image) for image in shown), ids
        context.close()
    finally:
        srv.stop()


# --- screenshots for the README ------------------------------------------------------------------


def index_demo_images(srv, images: Path, limit: int = 200) -> None:
    """The demo's held-out renders (``000123_red_circle_large_left.png``) into ``demo``."""
    import httpx

    with httpx.Client(base_url=srv.url, timeout=300) as client:
        paths = sorted(images.glob("*.png"))[:limit]
        for start in range(0, len(paths), 32):
            docs = []
            for p in paths[start : start + 32]:
                colour, shape, size, position = p.stem.split("_")[1:5]
                meta = {"colour": colour, "shape": shape, "size": size, "position": position}
                docs.append(
                    {"id": p.stem, "image": base64.b64encode(p.read_bytes()).decode(), "metadata": meta}
                )
            response = client.post("/collections/demo/documents", json={"documents": docs})
            response.raise_for_status()


def save_small(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG: the same picture, under half the bytes."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


def main() -> None:
    """Screenshots of the page on the trained demo model (``make serve``'s) for docs/."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="the demo model directory (.cache/demo/model)")
    parser.add_argument("--images", required=True, help="demo eval images (.cache/demo/data/images/eval)")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    import tempfile

    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp())
    srv = start_server(Path(args.model), work, "--max-inputs-per-request", "32")
    try:
        index_demo_images(srv, Path(args.images), args.limit)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(srv.url + "/")
            page.locator("#collection").select_option("demo")
            page.locator("#query-text").fill("a red circle")
            page.locator("#query-text").press("Enter")
            page.locator("#results .card").nth(11).wait_for()
            save_small(page.screenshot(), out / "search-page.png")
            page.locator("#results .card").first.click()
            page.locator("#details").wait_for(state="visible")
            save_small(page.screenshot(), out / "search-page-details.png")
            browser.close()
        print(f"wrote {out / 'search-page.png'} and {out / 'search-page-details.png'}")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()


def test_the_mode_switch_finds_a_part_number_by_its_words(page_server, page):
    """Keyword and hybrid modes find the one document whose text holds the typed part number
    (the tiny model's random embedding cannot tell the parts apart)."""
    codes = ["QX-4821", "BT-1290", "LM-7733", "ZR-5150", "KP-3306", "HV-9082"]
    documents = [
        {"id": f"bolt-{code}", "text": f"Hex bolt M8, zinc plated, part number {code}"} for code in codes
    ]
    with page_server.client() as client:
        response = client.post("/collections/parts/documents", json={"documents": documents})
        assert response.status_code == 200, response.text
    page.goto(page_server.url + "/")
    page.locator("#collection").select_option("parts")
    assert page.locator("#query-mode option").evaluate_all("os => os.map(o => o.value)") == [
        "vector", "keyword", "hybrid"
    ]  # fmt: skip
    for mode, expected in (("keyword", 1), ("hybrid", len(codes))):
        page.locator("#query-mode").select_option(mode)
        page.locator("#query-text").fill("LM-7733")
        page.locator("#search-button").click()
        page.wait_for_function(
            f"document.querySelectorAll('#results .card').length === {expected} && "
            "document.querySelector('#results .card').dataset.id === 'bolt-LM-7733'"
        )
    page.locator("#query-text").fill("")
    page.locator("#search-button").click()
    assert "type one" in page.locator("#message").text_content()
