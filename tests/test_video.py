"""``tvmedge video``: a generated clip of moving shapes through the trained shapes-seg model,
checked against the clip's ground truth (from the masks, and read back from the encoded
overlay), per-stage timings, real-time drops, bad input, and a pool that dies mid-stream."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tvmedge.app.video import VideoFailed, mask_from_overlay, process_video, read_frames, upsample_nearest, write_clip
from tvmedge.core.metrics import mean_iou
from tvmedge.core.schema import validate
from tvmedge.deploy.pool import open_pool
from tvmedge.zoo.shapes import moving_clip

from conftest import run_cli

FRAMES, SIZE = 32, 96


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    rgb, labels = moving_clip(FRAMES, SIZE)
    path = write_clip(d / "clip.mp4", rgb, crf=12)
    np.save(d / "gt.npy", labels)
    return path, labels, d / "gt.npy"


def test_video_cli_writes_mp4_and_json_and_matches_ground_truth(clip, shapes_seg_tar, tmp_path):
    path, labels, gt = clip
    out = tmp_path / "out.mp4"
    proc = run_cli("video", str(path), str(shapes_seg_tar), "-o", str(out), "--threads", "1", "--labels", str(gt),
                   "--json", in_process=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    validate(doc)
    assert doc["command"] == "video" and doc["device"]["kind"] == "hardware"
    assert doc["frames"] == doc["decoded"] == FRAMES and doc["dropped"] == 0
    assert set(doc["stage_ms"]) == {"decode", "preprocess", "infer", "postprocess", "encode"}
    assert all(v is not None and v > 0 for v in doc["stage_ms"].values())
    assert doc["fps"] > 0 and doc["resized"] and doc["video_size"] == [SIZE, SIZE]
    assert "resized" in proc.stderr  # said so
    assert doc["miou"] > 0.7, doc["miou"]
    # the picture itself: read the class colours back from the encoded overlay
    src, dst = read_frames(path), read_frames(out)
    assert dst.shape == (FRAMES, SIZE, SIZE, 3)
    back = np.stack([mask_from_overlay(a, b, 4) for a, b in zip(src, dst)])
    assert mean_iou(back, labels, 4) > 0.6


def test_realtime_drops_frames_it_cannot_take(clip, shapes_seg_tar, tmp_path):
    path, _, _ = clip
    with open_pool(shapes_seg_tar, threads=1) as pool:
        # 2000 FPS is far beyond one thread's inference: most frames find the pipeline full
        res = process_video(path, tmp_path / "rt.mp4", pool, pool.meta, realtime=2000, queue_size=1)
    assert res.decoded == FRAMES and res.dropped > 0 and res.frames + res.dropped == FRAMES
    assert len(read_frames(tmp_path / "rt.mp4")) == res.frames


def test_unreadable_video_is_one_line(shapes_seg_tar, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    proc = run_cli("video", str(bad), str(shapes_seg_tar), "-o", str(tmp_path / "o.mp4"), in_process=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot read video bad.mp4")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_pool_lost_mid_video_leaves_a_valid_partial_file(clip, shapes_seg_tar, tracker, tmp_path):
    from tvmedge.deploy.launch import start_server

    path, _, _ = clip
    server = start_server(tracker.addr, "video-pool", env={"TVM_NUM_THREADS": "1"}, timeout=240)
    out = tmp_path / "partial.mp4"
    try:
        with open_pool(shapes_seg_tar, tracker.addr, ["video-pool"], threads=1) as pool:
            def killer():
                while pool.delivered < 10:
                    time.sleep(0.005)
                server.stop()
            threading.Thread(target=killer, daemon=True).start()
            with pytest.raises(VideoFailed, match="all devices of the pool were lost") as err:
                process_video(path, out, pool, pool.meta)
    finally:
        server.stop()
    written = err.value.result.frames
    assert 10 <= written < FRAMES
    assert len(read_frames(out)) == written  # a valid video up to the last written frame
