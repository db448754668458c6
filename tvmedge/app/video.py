"""``tvmedge video``: a compiled model over a video file, as a pipeline of threads.

Stages, each its own thread joined by bounded queues (FPS is bounded by the slowest stage,
not by their sum):

1. **decode** (PyAV, i.e. FFmpeg): frames of the first video stream; at ``realtime`` FPS the
   frames are released at that pace, like a camera, and a frame that finds the pipeline
   full is dropped (counted);
2. **preprocess**: resized to the model's input (FFmpeg's scaler; said once when the frame
   size differs), RGB scaled to [0, 1], then ``(x - mean) / std``, laid out as the input spec
   (NCHW or NHWC);
3. **infer**: :class:`tvmedge.deploy.pool.FramePool`, on this machine, one RPC device, or a
   pool of devices (``--pool``), results in order;
4. **postprocess**: a segmentation output (``[1, C, H, W]``) becomes the arg-max class map
   drawn over the frame in class colours; a classifier's (``[1, C]``) the top class written
   on the frame;
5. **encode** (PyAV, H.264 by default) into the output file.

Each stage's mean ms per frame, the end-to-end FPS and the dropped frames are reported. For
``infer`` that is the time between consecutive results (what the stage costs the stream: with
several frames in flight, or a pool, less than one call's latency; each device's own mean call
time is in the pool block).
If inference fails mid-stream (every pool device lost), the frames already encoded are
flushed and the file closed, so it is a valid video up to the last written frame.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.errors import TvmedgeError, first_line

STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")
_END = object()

# Overlay colours per class (class 0, the background, is left as it is).
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)
ALPHA = 0.6  # overlay opacity


def palette(n: int) -> np.ndarray:
    """``n`` overlay colours (RGB uint8), repeating the base palette past ten classes."""
    reps = -(-n // len(PALETTE))
    return np.tile(PALETTE, (reps, 1))[:n]


def overlay(rgb: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) with the pixels of every non-background class of ``mask``
    (H, W) blended with its colour."""
    out = rgb.astype(np.float32)
    fg = mask > 0
    colours = palette(num_classes).astype(np.float32)
    out[fg] = (1 - ALPHA) * out[fg] + ALPHA * colours[mask[fg]]
    return out.round().clip(0, 255).astype(np.uint8)


def mask_from_overlay(rgb_in: np.ndarray, rgb_out: np.ndarray, num_classes: int) -> np.ndarray:
    """The class map an overlay was drawn with, read back from the input and output frames:
    each pixel's colour change is matched to the nearest class colour (no change: class 0)."""
    a = rgb_in.astype(np.float32)
    b = rgb_out.astype(np.float32)
    cand = np.stack([a] + [(1 - ALPHA) * a + ALPHA * c for c in palette(num_classes).astype(np.float32)[1:]])
    return np.abs(cand - b[None]).sum(axis=-1).argmin(axis=0)


def upsample_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    ys = (np.arange(height) * mask.shape[0] // height).clip(0, mask.shape[0] - 1)
    xs = (np.arange(width) * mask.shape[1] // width).clip(0, mask.shape[1] - 1)
    return mask[ys[:, None], xs[None, :]]


@dataclass
class InputSpec:
    """How a frame becomes the model's input."""

    name: str
    shape: list[int]
    dtype: str
    layout: str  # NCHW or NHWC
    height: int
    width: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_meta(cls, meta: dict[str, Any], mean: Sequence[float] = (0.0, 0.0, 0.0),
                  std: Sequence[float] = (1.0, 1.0, 1.0)) -> "InputSpec":
        if len(meta["inputs"]) != 1:
            raise TvmedgeError(f"video needs a model with one image input; this one has {len(meta['inputs'])}")
        spec = meta["inputs"][0]
        shape = [int(d) for d in spec["shape"]]
        if len(shape) != 4 or shape[0] != 1 or 3 not in (shape[1], shape[3]):
            raise TvmedgeError(f"video needs an image input [1, 3, H, W] or [1, H, W, 3]; "
                               f"input '{spec['name']}' is {shape}")
        layout = "NCHW" if shape[1] == 3 else "NHWC"
        h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        return cls(spec["name"], shape, spec["dtype"], layout, h, w, np.asarray(mean, np.float32),
                   np.asarray(std, np.float32))

    def tensor(self, rgb: np.ndarray) -> np.ndarray:
        """A resized ``rgb`` (H, W, 3 uint8) as the model's input array."""
        x = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        x = x.transpose(2, 0, 1) if self.layout == "NCHW" else x
        return np.ascontiguousarray(x[None]).astype(self.dtype, copy=False)


@dataclass
class VideoResult:
    frames: int = 0  # frames written
    dropped: int = 0  # frames dropped at the real-time rate
    decoded: int = 0
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    stage_n: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    input_size: tuple[int, int] = (0, 0)  # width, height of the video
    model_size: tuple[int, int] = (0, 0)
    resized: bool = False
    kind: str = ""  # segmentation or classification
    masks: list[np.ndarray] = field(default_factory=list)  # kept when asked (checks)
    labels: list[int] = field(default_factory=list)
    pool: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "decoded": self.decoded, "dropped": self.dropped,
            "wall_s": self.wall_s, "fps": self.frames / self.wall_s if self.wall_s else None,
            "stage_ms": {s: (1e3 * self.stage_s[s] / self.stage_n[s] if self.stage_n[s] else None) for s in STAGES},
            "bottleneck": max(STAGES, key=lambda s: self.stage_s[s] / max(1, self.stage_n[s])),
            "video_size": list(self.input_size), "model_size": list(self.model_size), "resized": self.resized,
            "kind": self.kind, "pool": self.pool, "error": self.error,
        }


class _Stage:
    """A thread that maps items from ``inq`` to ``outq`` with ``fn``, timing each call."""

    def __init__(self, name: str, fn: Callable[[Any], Any], inq: queue.Queue, outq: queue.Queue | None,
                 result: VideoResult, failures: list) -> None:
        self.name, self.fn, self.inq, self.outq, self.result, self.failures = name, fn, inq, outq, result, failures
        self.thread = threading.Thread(target=self._run, name=f"tvmedge-video-{name}", daemon=True)

    def _run(self) -> None:
        try:
            while True:
                item = self.inq.get()
                if item is _END:
                    break
                t0 = time.perf_counter()
                out = self.fn(item)
                self.result.stage_s[self.name] += time.perf_counter() - t0
                self.result.stage_n[self.name] += 1
                if self.outq is not None:
                    self.outq.put(out)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.failures.append(e)
            while self.inq.get() is not _END:  # keep the upstream stage from blocking
                pass
        finally:
            if self.outq is not None:
                self.outq.put(_END)


def _open_input(path: str | Path):
    import av

    path = Path(path)
    if not path.exists():
        raise TvmedgeError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise TvmedgeError(f"cannot read video {path.name}: {first_line(e)}") from None
    if not container.streams.video:
        container.close()
        raise TvmedgeError(f"{path.name} has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        container.close()
        raise TvmedgeError(f"{path.name}: unsupported video codec")
    return container, stream


def write_clip(path: str | Path, rgb_frames: np.ndarray, fps: int = 30, codec: str = "libx264",
               crf: int = 18) -> Path:
    """Encode ``rgb_frames`` (N, H, W, 3 uint8) into a video file (e.g. a generated test clip)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = rgb_frames.shape[2], rgb_frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for rgb in rgb_frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        out.mux(stream.encode(None))
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """Every frame of a video as RGB (N, H, W, 3 uint8)."""
    container, stream = _open_input(path)
    with container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def process_video(src: str | Path, dst: str | Path, pool: Any, meta: dict[str, Any], *,
                  realtime: float | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                  std: Sequence[float] = (1.0, 1.0, 1.0), codec: str = "libx264", crf: int = 23,
                  keep_masks: bool = False, queue_size: int = 4, log: Callable[[str], Any] | None = None
                  ) -> VideoResult:
    """Run ``src`` through the model on ``pool`` (a :class:`~tvmedge.deploy.pool.FramePool`)
    and write the annotated video to ``dst``; see the module docstring."""
    import av

    spec = InputSpec.from_meta(meta, mean, std)
    out_shape = [int(d) for d in meta["outputs"][0]["shape"]]
    if len(out_shape) == 4:
        kind, num_classes = "segmentation", out_shape[1]
    elif len(out_shape) == 2:
        kind, num_classes = "classification", out_shape[1]
    else:
        raise TvmedgeError(f"video post-processing knows segmentation [1, C, H, W] and class scores [1, C] "
                           f"outputs; this model's first output is {out_shape}")
    res = VideoResult(kind=kind, model_size=(spec.width, spec.height))
    container, stream = _open_input(src)
    res.input_size = (stream.codec_context.width, stream.codec_context.height)
    if res.input_size != (spec.width, spec.height):
        res.resized = True
        if log is not None:
            log(f"video frames are {res.input_size[0]}x{res.input_size[1]}, the model takes "
                f"{spec.width}x{spec.height}: frames are resized to it (the overlay is drawn at full size)")
    rate = stream.average_rate or stream.guessed_rate or 30
    dst = Path(dst)
    try:
        output = av.open(str(dst), "w")
    except (av.error.FFmpegError, OSError) as e:
        container.close()
        raise TvmedgeError(f"cannot write {dst}: {first_line(e)}") from None
    ostream = output.add_stream(codec, rate=rate)
    ostream.width, ostream.height = res.input_size
    ostream.pix_fmt = "yuv420p"
    if codec == "libx264":
        ostream.options = {"crf": str(crf)}

    q_dec, q_pre, q_inf, q_post = (queue.Queue(maxsize=queue_size) for _ in range(4))
    failures: list[BaseException] = []
    stop = threading.Event()

    def decode() -> None:
        try:
            frames = container.decode(stream)
            start = time.perf_counter()
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                res.stage_s["decode"] += time.perf_counter() - t0
                res.stage_n["decode"] += 1
                i = res.decoded
                res.decoded += 1
                if realtime:
                    # a camera delivers frame i at i / rate; one that finds the pipeline full is lost
                    due = start + i / realtime
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    try:
                        q_dec.put_nowait(frame)
                    except queue.Full:
                        res.dropped += 1
                else:
                    q_dec.put(frame)
        except av.error.FFmpegError as e:
            failures.append(TvmedgeError(f"cannot decode {Path(src).name}: {first_line(e)}"))
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        finally:
            q_dec.put(_END)

    def preprocess(frame: Any) -> tuple[np.ndarray, np.ndarray]:
        rgb = frame.to_ndarray(format="rgb24")
        small = rgb if not res.resized else frame.reformat(width=spec.width, height=spec.height,
                                                           format="rgb24").to_ndarray()
        return rgb, spec.tensor(small)

    # infer: the pool's in-order map, fed from q_pre; the frames ride along in a FIFO
    pending: "queue.SimpleQueue[np.ndarray]" = queue.SimpleQueue()

    def infer_inputs() -> Iterator[dict[str, np.ndarray]]:
        while True:
            item = q_pre.get()
            if item is _END:
                return
            rgb, x = item
            pending.put(rgb)
            yield {spec.name: x}

    def infer() -> None:
        try:
            t_last = None
            for outs in pool.map(infer_inputs()):
                now = time.perf_counter()
                # time from the previous result to this one: the stage's throughput cost per frame
                res.stage_s["infer"] += now - (t_last if t_last is not None else now)
                res.stage_n["infer"] += 1 if t_last is not None else 0
                t_last = now
                q_inf.put((pending.get(), outs[0]))
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
            stop.set()
            while q_pre.get() is not _END:
                pass
        finally:
            q_inf.put(_END)

    def postprocess(item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        rgb, logits = item
        if kind == "segmentation":
            mask = logits[0].argmax(axis=0)
            if keep_masks:
                res.masks.append(mask)
            return overlay(rgb, upsample_nearest(mask, rgb.shape[0], rgb.shape[1]), num_classes)
        label = int(logits.reshape(-1).argmax())
        res.labels.append(label)
        return _write_label(rgb, f"class {label}")

    threads = [threading.Thread(target=decode, name="tvmedge-video-decode", daemon=True),
               _Stage("preprocess", preprocess, q_dec, q_pre, res, failures).thread,
               threading.Thread(target=infer, name="tvmedge-video-infer", daemon=True),
               _Stage("postprocess", postprocess, q_inf, q_post, res, failures).thread]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        while True:  # encode, on this thread
            rgb = q_post.get()
            if rgb is _END:
                break
            t1 = time.perf_counter()
            output.mux(ostream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            res.stage_s["encode"] += time.perf_counter() - t1
            res.stage_n["encode"] += 1
            res.frames += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        try:  # flush: the file is valid up to the last frame written, whatever happened
            output.mux(ostream.encode(None))
        finally:
            output.close()
            container.close()
        res.wall_s = time.perf_counter() - t0
        res.pool = pool.stats() if hasattr(pool, "stats") else None
    if failures:
        err = failures[0]
        res.error = first_line(err)
        if isinstance(err, TvmedgeError):
            raise VideoFailed(f"{err} ({res.frames} frames written to {dst.name}, a valid video up to there)",
                              res) from None
        raise err
    return res


class VideoFailed(TvmedgeError):
    """The pipeline stopped part-way; ``result`` says how far it got (the output file is valid)."""

    def __init__(self, msg: str, result: VideoResult):
        super().__init__(msg)
        self.result = result


def _write_label(rgb: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 8 + 7 * len(text), 16], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


def video_json(res: VideoResult, pool: Any, args: Any = None, labels: np.ndarray | None = None) -> dict[str, Any]:
    """``tvmedge video --json``: the run in the tvmedge/1 envelope, every device with its kind
    (hardware / emulated), and the mIoU against ``labels`` (N, H, W) when given."""
    from ..core.metrics import mean_iou
    from ..core.schema import envelope

    body = res.to_json()
    body["devices"] = [d.block for d in pool.devices] if hasattr(pool, "devices") else []
    if len(body["devices"]) == 1:
        body["device"] = body["devices"][0]
    body["input"] = str(getattr(args, "input", "")) or None
    body["output"] = str(getattr(args, "output", "")) or None
    body["realtime_fps"] = getattr(args, "realtime", None)
    body["miou"] = None
    if labels is not None and res.kind == "segmentation" and res.masks:
        if labels.ndim != 3 or labels.shape[1:] != (res.input_size[1], res.input_size[0]):
            raise TvmedgeError(f"--labels must be [frames, {res.input_size[1]}, {res.input_size[0]}] class maps, "
                               f"got {list(labels.shape)}")
        if res.dropped:
            raise TvmedgeError("--labels cannot be matched to frames when frames were dropped (--realtime)")
        n = min(len(res.masks), len(labels))
        h, w = labels.shape[1:]
        pred = np.stack([upsample_nearest(m, h, w) for m in res.masks[:n]])
        num_classes = int(max(labels.max(), pred.max())) + 1
        body["miou"] = mean_iou(pred, labels[:n], num_classes)
    return envelope("video", body)
