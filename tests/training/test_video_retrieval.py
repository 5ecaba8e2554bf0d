"""Text-video retrieval: R@K as CLIP4Clip computes them, the MSR-VTT and MSVD layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from training import video_retrieval as vr


def _clip4clip_single(sim: np.ndarray) -> np.ndarray:
    """CLIP4Clip's ``compute_metrics`` ranks (0-based): sort each row descending, find the
    diagonal's value in it."""
    sx = np.sort(-sim, axis=1)
    d = np.diag(-sim)[:, None]
    return np.where(sx - d == 0)[1]


def _clip4clip_multi(sim: np.ndarray, cut_off: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Their multi-sentence path: captions grouped by clip into a (clips, max, clips) tensor
    padded with -inf; text->video ranks of each caption, video->text from the best caption."""
    starts = [0, *cut_off[:-1]]
    longest = max(e - s for s, e in zip(starts, cut_off, strict=True))
    groups = np.stack(
        [
            np.concatenate([sim[s:e], np.full((longest - e + s, sim.shape[1]), -np.inf)])
            for s, e in zip(starts, cut_off, strict=True)
        ]
    )  # (clips, longest, clips)
    t2v = []
    for clip, (s, e) in enumerate(zip(starts, cut_off, strict=True)):
        for row in sim[s:e]:
            t2v.append(int((np.argsort(-row, kind="stable").argsort(kind="stable"))[clip]))
    best = groups.max(axis=1).T  # (clips, caption groups)
    return np.asarray(t2v), _clip4clip_single(best)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_one_caption_per_clip_matches_clip4clip():
    rng = np.random.default_rng(0)
    videos = _unit(rng.normal(size=(12, 8)))
    texts = _unit(videos + rng.normal(scale=0.9, size=videos.shape))
    out = vr.score(texts, videos, list(range(12)))
    sim = texts @ videos.T
    t2v, v2t = _clip4clip_single(sim), _clip4clip_single(sim.T)
    for got, ranks in ((out["text_to_video"], t2v), (out["video_to_text"], v2t)):
        assert got["R@1"] == pytest.approx(100 * np.mean(ranks == 0))
        assert got["R@5"] == pytest.approx(100 * np.mean(ranks < 5))
        assert got["MdR"] == pytest.approx(np.median(ranks) + 1) and got["MnR"] == pytest.approx(
            np.mean(ranks) + 1
        )
    assert 0 < out["text_to_video"]["R@1"] < 100  # neither trivial nor hopeless


def test_several_captions_per_clip_matches_clip4clip():
    rng = np.random.default_rng(1)
    videos = _unit(rng.normal(size=(7, 6)))
    owner = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6]
    texts = _unit(videos[owner] + rng.normal(scale=1.0, size=(len(owner), 6)))
    out = vr.score(texts, videos, owner)
    cut_off = [owner.index(c) + owner.count(c) for c in range(7)]
    t2v, v2t = _clip4clip_multi(texts @ videos.T, cut_off)
    assert out["text_to_video"]["queries"] == 12 and out["video_to_text"]["queries"] == 7
    assert out["text_to_video"]["R@1"] == pytest.approx(100 * np.mean(t2v == 0))
    assert out["text_to_video"]["MnR"] == pytest.approx(np.mean(t2v) + 1)
    assert out["video_to_text"]["R@1"] == pytest.approx(100 * np.mean(v2t == 0))
    assert out["video_to_text"]["MnR"] == pytest.approx(np.mean(v2t) + 1)


def test_layouts_are_read_and_the_captions_pickle_holds_plain_data_only(tmp_path):
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7001,video7001,a man sings\n"
    )
    data = vr.load("msrvtt", tmp_path / "MSRVTT_JSFUSION_test.csv", tmp_path / "videos")
    assert data.videos == [tmp_path / "videos" / "video7001.mp4"] and data.captions == ["a man sings"]

    msvd = tmp_path / "msvd"
    (msvd / "clips").mkdir(parents=True)
    (msvd / "test_list.txt").write_text("clipA\nclipB\n")
    (msvd / "clips" / "clipA.avi").write_bytes(b"x")
    (msvd / "clips" / "clipB.mp4").write_bytes(b"x")
    (msvd / "raw-captions.pkl").write_bytes(
        pickle.dumps({"clipA": [["a", "cat"], ["the", "cat"]], "clipB": [["dogs"]]})
    )
    data = vr.load("msvd", msvd, None)
    assert [p.name for p in data.videos] == ["clipA.avi", "clipB.mp4"]
    assert data.captions == ["a cat", "the cat", "dogs"] and data.owner == [0, 0, 1]

    class Evil:
        def __reduce__(self):
            return (print, ("never run",))

    (msvd / "raw-captions.pkl").write_bytes(pickle.dumps({"clipA": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match="plain data"):
        vr.load("msvd", msvd, None)


def test_paper_reference_and_report():
    ref = vr.paper_reference("paper:LLaVE-7B", "msvd")
    assert ref["text_to_video"] == {"R@1": 52.9, "R@5": 80.1, "R@10": 87.0}
    with pytest.raises(ValueError, match="LLaVE-7B only"):
        vr.paper_reference("paper:LLaVE-0.5B", "msrvtt")
    m = {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "MdR": 1.5, "MnR": 2.0, "queries": 4}
    text = vr.format_report(
        {"dataset": "MSVD", "captions": 4, "videos": 4, "text_to_video": m, "video_to_text": m}, ref
    )
    assert (
        "| text -> video | 50.0 | 75.0 | 100.0 | 1.5 | 2.0 |" in text
        and "| Δ | -2.9 | -5.1 | +13.0 |" in text
    )
