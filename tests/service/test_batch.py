"""``python -m service.batch`` on a real local Ray cluster (started once for the module).

Inputs are made by their real producers (Pillow images, JSON lines, Parquet by pyarrow,
WebDataset shards by the ``webdataset`` library), on local disk and on an S3-compatible
server (moto's server mode on loopback). Vectors are checked against the real server's
``/embed``; faults are real: an actor process is SIGKILLed in the middle of a block, the
driver process is SIGKILLed while a block is in flight and the job rerun. Both faults fire at
a set block (``tests/service/faults.py``), never after a timer.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="the batch extra (pip install '.[batch]')")

from service.batch.job import run_job  # noqa: E402
from service.batch.manifest import Manifest  # noqa: E402
from service.batch.parquet import read_shards  # noqa: E402
from service.batch.sinks import SinkSpec  # noqa: E402
from service.batch.sources import ReadOptions  # noqa: E402
from service.batch.stages import JobSpec, ModelSpec  # noqa: E402
from tests.conftest import make_png  # noqa: E402
from tests.service.conftest import REPO  # noqa: E402
from tests.service.faults import BATCH_FAULT_AT  # noqa: E402

INSTRUCTION = "Represent the given item:"
BUCKET = "corpus"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server on loopback; the AWS_* variables point every client at it
    (set before Ray starts, so its workers inherit them)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def batch_faults(tmp_path_factory):
    """The folder of the model actors' fault markers (``tests/service/faults.py``), named in
    the environment before Ray starts so its workers inherit it."""
    folder = tmp_path_factory.mktemp("batch-faults")
    saved = os.environ.get("TEST_LLAVE_BATCH_FAULTS")
    os.environ["TEST_LLAVE_BATCH_FAULTS"] = str(folder)
    yield folder
    (folder / "open").touch()
    if saved is None:
        os.environ.pop("TEST_LLAVE_BATCH_FAULTS")
    else:
        os.environ["TEST_LLAVE_BATCH_FAULTS"] = saved


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint, batch_faults):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _write_corpus(root: Path) -> dict[str, dict]:
    """A folder of images, JSON lines (project format), MMEB rows in Parquet and WebDataset
    shards; returns {id: the input /embed should equal} for every good item."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    expected: dict[str, dict] = {}
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(5):
        rel = f"{'sub/' if i % 2 else ''}im{i}.png"
        data = make_png(24 + 7 * i, 40, (40 * i, 90, 200 - 30 * i))
        (images / rel).write_bytes(data)
        expected[rel] = {"image": data}
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image")

    rows = root / "rows"
    rows.mkdir()
    (rows / "pic.png").write_bytes(make_png(50, 30, (10, 200, 10)))
    lines = [{"id": f"t{i}", "text": f"document number {i}", "metadata": {"n": i}} for i in range(4)]
    lines += [
        {"id": "with-image", "image": "pic.png", "text": "a green picture"},
        {"id": "own-instruction", "text": "kept as is", "instruction": "Find a caption:"},
        {
            "id": "interleaved",
            "content": [{"type": "text", "text": "see "}, {"type": "image", "image": "pic.png"}],
        },
        {"id": "gone", "image": "missing.png"},
        {"text": "no id"},
    ]
    text = (
        "\n".join(json.dumps(x) for x in lines[:3])
        + "\n{not json\n\n"
        + "\n".join(json.dumps(x) for x in lines[3:])
    )
    (rows / "docs.jsonl").write_text(text + "\n")
    pic = (rows / "pic.png").read_bytes()
    for x in lines[:4]:
        expected[x["id"]] = {"text": x["text"]}
    expected["with-image"] = {"image": pic, "text": "a green picture"}
    expected["own-instruction"] = {"text": "kept as is", "instruction": "Find a caption:"}
    expected["interleaved"] = {"content": [{"type": "text", "text": "see "}, {"type": "image", "image": pic}]}

    mmeb = [
        {"qry_text": "<|image_1|>\nRepresent the given image.", "qry_img_path": "pic.png", "dataset": "toy"},
        {"qry_text": "Find me an everyday image that matches: a green square", "qry_img_path": ""},
        {"qry_text": "two markers <|image_1|><|image_1|>", "qry_img_path": "pic.png"},
    ]
    pq.write_table(pa.Table.from_pylist(mmeb), rows / "mmeb.parquet")
    expected["mmeb.parquet:1"] = {
        "content": [{"type": "image", "image": pic}, {"type": "text", "text": "\nRepresent the given image."}]
    }
    expected["mmeb.parquet:2"] = {"content": [{"type": "text", "text": mmeb[1]["qry_text"]}]}

    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        with wds.TarWriter(str(shards / f"shard-{s:03d}.tar")) as sink:
            for j in range(3):
                key = f"s{s}-{j:02d}"
                png = make_png(30 + j, 30 + s, (200, 20 * j, 60))
                sink.write({"__key__": key, "png": png, "txt": f"caption {key}", "json": {"shard": s}})
                expected[key] = {"image": png, "text": f"caption {key}"}
            sink.write({"__key__": f"s{s}-empty", "cls": b"3"})
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, _write_corpus(root)


def _sources(base: str) -> list[str]:
    return [f"{base}/images", f"{base}/rows/docs.jsonl", f"{base}/rows/mmeb.parquet", f"{base}/shards"]


EXPECTED_FAILURES = {"image_decode": 1, "bad_row": 3, "missing_file": 1, "empty": 2}


def _job(
    checkpoint,
    sink: SinkSpec,
    *,
    block_size=3,
    instruction=INSTRUCTION,
    source_options=None,
    embedder_factory=None,
) -> JobSpec:
    from service import limits

    return JobSpec(
        model=ModelSpec(
            checkpoint=str(checkpoint),
            device="cpu",
            dtype="float32",
            batch_size=4,
            embedder_factory=embedder_factory,
        ),
        read=ReadOptions(instruction=instruction, block_size=block_size),
        sink=sink,
        source_options=source_options,
        image_limits=limits.image_limits(),
    )


def _vectors(out: str) -> dict[str, np.ndarray]:
    table = read_shards(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    return dict(zip(ids, table.column("vector").to_numpy(zero_copy_only=False), strict=True))


def _embed(server, inputs: list[dict]) -> np.ndarray:
    def wire(x):
        if isinstance(x, bytes):
            return base64.b64encode(x).decode()
        if isinstance(x, list):
            return [wire(v) for v in x]
        if isinstance(x, dict):
            return {k: wire(v) for k, v in x.items()}
        return x

    out = []
    with server.client() as c:
        for i in range(0, len(inputs), 8):
            r = c.post("/embed", json={"inputs": [wire(x) for x in inputs[i : i + 8]]})
            assert r.status_code == 200, r.text
            out += r.json()["embeddings"]
    return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- tests


def test_local_and_s3_sources_to_parquet_equal_embed(ray_cluster, corpus, tiny_checkpoint, server, tmp_path):
    """Every format from local disk, then the same from S3 into S3; vectors equal /embed's."""
    root, expected = corpus
    out = str(tmp_path / "out")
    summary = run_job(_sources(str(root)), _job(tiny_checkpoint, SinkSpec(kind="parquet", where=out)), out)
    assert summary.failures_by_reason == EXPECTED_FAILURES
    assert summary.items == summary.items_total == len(expected)
    vectors = _vectors(out)
    assert set(vectors) == set(expected)
    ids = sorted(expected)
    want = _embed(
        server, [{**expected[i], "instruction": expected[i].get("instruction", INSTRUCTION)} for i in ids]
    )
    got = np.stack([vectors[i] for i in ids])
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert {f["reason"] for f in failures} == set(EXPECTED_FAILURES)
    assert any(f["where"].endswith("docs.jsonl:4") and f["reason"] == "bad_row" for f in failures)  # bad JSON
    assert any(f.get("id") == "gone" and f["reason"] == "missing_file" for f in failures)

    # A rerun finds every block in the manifest and does nothing.
    again = run_job(_sources(str(root)), _job(tiny_checkpoint, SinkSpec(kind="parquet", where=out)), out)
    assert (again.blocks_run, again.blocks_done_before, again.items_total) == (
        0,
        summary.blocks,
        len(expected),
    )

    # The same corpus on S3, written to S3.
    import boto3

    s3 = boto3.client("s3")
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"in/{path.relative_to(root).as_posix()}")
    s3_out = f"s3://{BUCKET}/out"
    with_source = SinkSpec(kind="parquet", where=s3_out, with_source=True)
    remote = run_job(
        _sources(f"s3://{BUCKET}/in"), _job(tiny_checkpoint, with_source, source_options=SOURCES), s3_out
    )
    assert remote.failures_by_reason == EXPECTED_FAILURES
    s3_vectors = _vectors(s3_out)
    # ids of S3 rows without their own id name the file (mmeb.parquet:N), as on disk
    assert set(s3_vectors) == set(vectors)
    for i in ids:
        np.testing.assert_allclose(s3_vectors[i], vectors[i], atol=1e-6, rtol=0)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]
    assert any(o["Key"] == "out/failures.jsonl" for o in listed)

    # The shards, with their sources, load into a collection (python -m service.migrate).
    from service.migrate import main as migrate_main

    loaded = str(tmp_path / "loaded")
    assert migrate_main(["--from-parquet", s3_out, "--to", loaded, "--collection", "docs"]) == 0
    _check_collection(loaded, set(expected), vectors)


SOURCES = {"store_source": True, "thumbnail_size": 256, "thumbnail_format": "webp"}


def _check_collection(where: str, ids: set[str], vectors: dict[str, np.ndarray]) -> None:
    from service.storage import open_store

    store = open_store(where)
    try:
        assert store.describe("docs")["count"] == len(ids)
        doc = store.get("docs", "with-image", with_vector=True)
        np.testing.assert_allclose(doc["vector"], vectors["with-image"], atol=1e-6, rtol=0)
        assert (doc["text"], doc["thumbnails"], doc["metadata"]) == ("a green picture", 1, None)
        assert store.get("docs", "t2")["metadata"] == {"n": 2}
    finally:
        store.close()


def test_store_targets(ray_cluster, corpus, tiny_checkpoint, postgres_url, server, tmp_path):
    """Straight into the embedded store (the driver writes) and into PostgreSQL (workers
    write), sources (text, thumbnails) included, upsert by id."""
    root, expected = corpus
    sources = [f"{root}/images", f"{root}/rows/docs.jsonl"]
    ids = sorted(i for i in expected if not i.startswith(("s0", "s1", "mmeb")))
    want = _embed(
        server, [{**expected[i], "instruction": expected[i].get("instruction", INSTRUCTION)} for i in ids]
    )
    vectors = dict(zip(ids, want, strict=True))
    for where, job_dir in ((str(tmp_path / "data"), None), (postgres_url, str(tmp_path / "pg-job"))):
        sink = SinkSpec(kind="store", where=where, collection="docs")
        summary = run_job(
            sources, _job(tiny_checkpoint, sink, source_options=SOURCES), job_dir or str(tmp_path / "job")
        )
        assert summary.items == len(ids)
        _check_collection(where, set(ids), vectors)


def _text_rows(path: Path, n: int) -> None:
    path.write_text(
        "".join(json.dumps({"id": f"d{i:03d}", "text": f"text {i} " * (i % 7 + 1)}) + "\n" for i in range(n))
    )


def _wait_for_records(job_dir: str, at_least: int, proc=None, timeout: float = 120.0) -> dict:
    manifest = Manifest(job_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest.root.fs.get_file_info(manifest.root.child("blocks").path).type.name == "Directory":
            records = manifest.finished()
            if len(records) >= at_least:
                return records
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks finished in {timeout} s")


def _wait_for_file(path: Path, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard only
    while not path.exists():
        assert proc.poll() is None, f"the job ended early: {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_killed_actor_is_retried_without_duplicates(ray_cluster, batch_faults, tiny_checkpoint, tmp_path):
    """The model actor SIGKILLs its own process in the middle of its third block (once: the
    actor Ray restarts runs normally): Ray retries the blocks it held, the rest run in the
    new process, and every id is in the output once."""
    n = 16  # 8 blocks: two before the kill, the rest after it
    _text_rows(tmp_path / "docs.jsonl", n)
    out = str(tmp_path / "out")
    job = _job(
        tiny_checkpoint,
        SinkSpec(kind="parquet", where=out),
        block_size=2,  # one forward per block (batch_size 4)
        instruction=None,
        embedder_factory="tests.service.faults:kill_batch_actor",
    )
    summary = run_job([str(tmp_path / "docs.jsonl")], job, out)
    assert (batch_faults / "killed").exists(), "the actor was not killed"
    killed = int((batch_faults / "killed").read_text())
    assert summary.blocks_done_before == 0 and summary.blocks_run == n // 2
    records = Manifest(out).finished()
    by_killed = [k for k, r in records.items() if r["embedded_by"] == killed]
    assert len(by_killed) == BATCH_FAULT_AT - 1  # the blocks before the kill
    assert len(summary.actor_pids - {killed}) >= 1  # the rest ran in the restarted actor
    vectors = _vectors(out)  # asserts no id twice
    assert sorted(vectors) == [f"d{i:03d}" for i in range(n)]


def test_killed_driver_resumes_from_the_manifest(ray_cluster, batch_faults, tiny_checkpoint, tmp_path):
    """The first run's model actor holds its third block; the test SIGKILLs the driver once
    the two blocks before it are in the manifest. The rerun skips those two and finishes."""
    n = 12  # one item per block
    _text_rows(tmp_path / "docs.jsonl", n)
    with (tmp_path / "docs.jsonl").open("a") as f:
        f.write('{"id": "bad", "text": 3}\n')  # a bad item: the exit status says so
    out = str(tmp_path / "out")
    args = [str(tmp_path / "docs.jsonl"), "--model", str(tiny_checkpoint)]
    args += ["--out", out, "--block-size", "1", "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "first.log").open("wb")
    # python -m service.batch whose actor holds in its third forward (one block each)
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.service.batch_driver", *args],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_file(batch_faults / "held", first)
        _wait_for_records(out, BATCH_FAULT_AT - 1, proc=first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done_before = len(Manifest(out).finished())
    assert done_before == BATCH_FAULT_AT - 1  # the held block never finished
    second = subprocess.run(
        [sys.executable, "-m", "service.batch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-3000:]  # finished, with one failed item
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["blocks_done_before"] == done_before
    assert summary["blocks_run"] == n + 1 - done_before
    assert (summary["items_total"], summary["failures_by_reason"]) == (n, {"invalid_input": 1})
    assert "batch: 100%" in second.stderr
    vectors = _vectors(out)  # asserts no id twice
    assert sorted(vectors) == [f"d{i:03d}" for i in range(n)]
