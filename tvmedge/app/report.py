"""``tvmedge report``: devices x model variants side by side, as a static page and JSON.

For each device and each variant (``fp32``, ``int8``, ``lowrank``, ``compact``; ``bnn`` for
the digits model) the model is rewritten (:mod:`tvmedge.optimize`), compiled for the device
(with ``--tuning-db`` records where given), run and timed there, and its accuracy or mIoU
measured there on the evaluation data. Where a device is reached decides what its figures
mean, and every row, table and figure says it:

* **measured** (``hardware``): this host, or a device registered at ``--rpc-tracker``
  under its key;
* **emulated**: a board tvmedge emulates under qemu (``pi3``/``pi4``/``pi5``), started on a
  private tracker when no real one is reachable. Its outputs (hence accuracy) are real;
  its timings are not the board's, so no FPS, energy or peak fraction is derived from them;
* **not measured**: a device that is neither (a Jetson without one on the tracker): the
  row shows the description's peak numbers and nothing else. No number is invented.

Energy per frame is an **estimate**: the description's power figure times the measured
latency. The peak fraction is the graph's conv/matmul FLOPs per second over the
description's peak FP32 FLOP/s. The roofline places each measured variant by an estimated
arithmetic intensity (those FLOPs over the bytes of weights, input and output: a lower
bound on traffic, so an upper bound on intensity), also labelled as such.

``report.json`` is the tvmedge/1 envelope (command ``report``) with one row per
(device, variant); ``index.html`` needs no server (tables and PNG plots beside it).
"""

from __future__ import annotations

import contextlib
import html
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.errors import TvmedgeError, first_line
from ..core.jsonio import dumps
from ..core.schema import device_block, envelope, latency_block

VARIANTS = ("fp32", "int8", "lowrank", "compact", "bnn")
EVAL_DATA = {"shapes-seg": "shapes", "digits-cnn": "digits", "digits-bnn": "digits"}
STATUS_TEXT = {"hardware": "measured on hardware", "emulated": "emulated (timings not meaningful)",
               "simulated": "simulated", "not measured": "not measured"}


@dataclass
class Reached:
    """How a device is reached for the report: a session (None: this host) and its status."""

    name: str
    status: str  # hardware | emulated | not measured
    session_factory: Callable[[], Any] | None = None  # opens an RPC session (None: run here)
    note: str = ""


# ---------------------------------------------------------------- model and variants
def _load(model: str, workdir: Path):
    from ..frontend import load_model

    if Path(model).exists():
        return load_model(model), None
    from .. import zoo

    entry = zoo.get(model)  # TvmedgeError naming the zoo models
    path = zoo.export(entry.name, workdir / f"{entry.name}.onnx")
    return load_model(path), entry.name


def _variant(name: str, model: Any, zoo_name: str | None, data: str | None, workdir: Path) -> tuple[Any, dict]:
    """The rewritten model and what was done (or TvmedgeError saying why not)."""
    from ..optimize.passes import PassContext, Pipeline, RewriteOptions, passes_from_options

    if name == "fp32":
        return model, {"rewrites": []}
    if name == "bnn":
        if zoo_name not in ("digits-cnn", "digits-bnn"):
            raise TvmedgeError("bnn: only the digits model has a binarized twin (digits-bnn)")
        from .. import zoo
        from ..frontend import load_model

        return load_model(zoo.export("digits-bnn", workdir / "digits-bnn.relax")), {"rewrites": ["binarized twin"]}
    opts = {"int8": RewriteOptions(quantize="int8"), "lowrank": RewriteOptions(lowrank_flops=0.5),
            "compact": RewriteOptions(compact=True)}.get(name)
    if opts is None:
        raise TvmedgeError(f"unknown variant '{name}' (known: {', '.join(VARIANTS)})")
    if data is None:
        raise TvmedgeError(f"{name}: needs calibration data (a zoo model with built-in data)")
    from ..optimize import data as data_mod

    ctx = PassContext(original=model, calib=data_mod.load(data, model, "calib", limit=64))
    new, rep = Pipeline(passes_from_options(opts), check=False)(model, ctx)
    return new, {"rewrites": [r.get("rewrite") for r in rep["rewrites"]]}


def _model_flops(model: Any) -> int | None:
    from ..optimize.lowrank import graph_flops

    try:
        return int(graph_flops(model.mod)) or None
    except Exception:  # noqa: BLE001 - a graph the counter does not know: no figure
        return None


def _model_bytes(model: Any, meta: dict[str, Any]) -> int:
    """Weights (constants in the graph) plus input and output tensors, in bytes."""
    import tvm
    from tvm import relax

    total = 0

    def visit(e: Any) -> None:
        nonlocal total
        if isinstance(e, tvm.ir.Constant) and hasattr(e.value, "shape"):
            total += int(np.prod(e.value.shape)) * np.dtype(str(e.value.dtype)).itemsize

    relax.analysis.post_order_visit(model.mod["main"], visit)
    for t in meta["inputs"] + meta["outputs"]:
        total += int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
    return total


# ---------------------------------------------------------------- devices
@contextlib.contextmanager
def _reach(names: list[str], tracker: str | None, log: Callable[[str], Any]) -> Iterator[dict[str, Reached]]:
    """Each device reached: here, through ``tracker``, emulated on a private tracker, or not."""
    from ..deploy.address import parse_host_port
    from ..deploy.session import connect
    from ..deploy.tracker import list_devices
    from ..target import resolve

    registered: set[str] = set()
    addr = parse_host_port(tracker) if tracker else None
    if addr is not None:
        registered = {d["key"] for d in list_devices(addr) if d["total"]}
    out: dict[str, Reached] = {}
    with contextlib.ExitStack() as stack:
        private = None
        for name in names:
            dev = resolve(name)
            key = dev.rpc_key or dev.name
            if name == "host":
                out[name] = Reached(name, "hardware")
            elif addr is not None and key in registered:
                out[name] = Reached(name, "hardware", lambda a=addr, k=key: connect(tracker=a, key=k, timeout=120))
            elif dev.emulator:
                from ..deploy.emulate import EmulatedDevice
                from ..deploy.launch import start_tracker

                if private is None:
                    private = stack.enter_context(start_tracker(port=0))
                emu_key = f"report-{name}-{os.getpid()}"
                log(f"[report] starting an EMULATED {name} (qemu); its timings are not the board's")
                stack.enter_context(EmulatedDevice(kind=name, tracker=private.addr, key=emu_key))
                out[name] = Reached(name, "emulated",
                                    lambda a=private.addr, k=emu_key: connect(tracker=a, key=k, timeout=300),
                                    note="qemu-user emulation")
            else:
                why = f"no '{key}' device at the RPC tracker" if addr is not None else "no --rpc-tracker given"
                out[name] = Reached(name, "not measured", note=f"{why}, and tvmedge cannot emulate it")
        yield out


# ---------------------------------------------------------------- one row
def _measure(art: Path, reached: Reached, data: Any, repeat: int, eval_samples: int) -> dict[str, Any]:
    from ..deploy.pool import open_pool
    from ..optimize.check import score
    from ..run import run_artifact

    sess = reached.session_factory() if reached.session_factory else None
    res = run_artifact(art, repeat=repeat, session=sess)
    metric = None
    if data is not None and data.labels is not None:
        samples = data.samples[:eval_samples]
        pool = open_pool(art, session=sess, session_name=reached.name) if sess is not None else open_pool(art)
        with pool:
            outs = [o[0] for o in pool.map(samples)]
        sub = type(data)(data.name, samples, data.labels[:len(samples)], data.metric, data.num_classes)
        metric = score([np.concatenate(outs)], sub)
    return {"latency": res.latencies_ms, "kind": res.device_kind, "threads": res.threads, "metric": metric,
            "device_block": res.device_block()}


def _row(dev: Any, reached: Reached, variant: str, **kw: Any) -> dict[str, Any]:
    rep = dev.report or {}
    return {"device_name": dev.name, "variant": variant, "status": reached.status,
            "status_text": STATUS_TEXT[reached.status], "note": reached.note,
            "peak_gflops_fp32": rep.get("peak_gflops_fp32"), "mem_bandwidth_gbs": rep.get("mem_bandwidth_gbs"),
            "power_w": rep.get("power_w"), "description_source": rep.get("source"), **kw}


def build_report(model: str, devices: list[str], variants: list[str], out_dir: Path, tuning_db: str | None = None,
                 tracker: str | None = None, repeat: int = 20, eval_samples: int = 64,
                 log: Callable[[str], Any] = print) -> Path:
    """Measure and write ``out_dir/index.html`` and ``out_dir/report.json``; returns ``out_dir``."""
    from ..build import compile_model
    from ..target import resolve

    for v in variants:
        if v not in VARIANTS:
            raise TvmedgeError(f"unknown variant '{v}' (known: {', '.join(VARIANTS)})")
    if not devices or not variants:
        raise TvmedgeError("report needs at least one device and one variant")
    resolved = {name: resolve(name) for name in devices}  # unknown device: one line, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tvmedge-report-"))
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    try:
        base, zoo_name = _load(model, workdir)
        data_name = EVAL_DATA.get(zoo_name or "")
        models: dict[str, tuple[Any, dict] | str] = {}
        for v in variants:
            try:
                models[v] = _variant(v, base, zoo_name, data_name, workdir)
                log(f"[report] variant {v}: ready")
            except TvmedgeError as e:
                models[v] = str(e)
                log(f"[report] variant {v}: skipped ({e})")
        from ..optimize import data as data_mod

        evals = {v: data_mod.load(data_name, m[0], "eval") for v, m in models.items()
                 if data_name and not isinstance(m, str)}
        with _reach(devices, tracker, log) as reached:
            for name in devices:
                dev, how = resolved[name], reached[name]
                for v in variants:
                    m = models[v]
                    if isinstance(m, str):
                        rows.append(_row(dev, how, v, skipped=m))
                        continue
                    if how.status == "not measured":
                        rows.append(_row(dev, how, v))
                        continue
                    rows.append(_one(dev, how, v, m[0], m[1], evals.get(v), workdir, tuning_db, repeat,
                                     eval_samples, compile_model, log))
        _baseline_drops(rows)
        doc = envelope("report", {"model": zoo_name or os.path.basename(model), "devices": devices,
                                  "variants": variants, "eval_data": data_name, "created_unix": t_start,
                                  "seconds": time.time() - t_start, "rows": rows})
        figures = _plots(rows, out_dir)
        doc["figures"] = figures
        (out_dir / "report.json").write_text(dumps(doc))
        (out_dir / "index.html").write_text(_html(doc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out_dir


def _one(dev: Any, how: Reached, variant: str, model: Any, info: dict, data: Any, workdir: Path,
         tuning_db: str | None, repeat: int, eval_samples: int, compile_model: Callable, log) -> dict[str, Any]:
    art = workdir / f"{dev.name}-{variant}.tar"
    try:
        meta = compile_model(model, dev, art, tuning_db=tuning_db, use_shipped=tuning_db is None)
        log(f"[report] {dev.name}/{variant}: compiled, running ({STATUS_TEXT[how.status]})")
        m = _measure(art, how, data, repeat, eval_samples)
    except TvmedgeError as e:
        return _row(dev, how, variant, error=first_line(e))
    lat = latency_block(m["latency"])
    flops = _model_flops(model)
    hw = m["kind"] == "hardware"
    peak = (dev.report or {}).get("peak_gflops_fp32")
    power = (dev.report or {}).get("power_w")
    gflops = flops / (lat["median"] * 1e6) if flops and hw else None
    row = _row(dev, how, variant, status=m["kind"] if how.status != "not measured" else how.status,
               device=m["device_block"], latency_ms=lat, threads=m["threads"],
               fps=1e3 / lat["median"] if hw else None,
               artifact_bytes=art.stat().st_size, library_bytes=meta.get("library_bytes"),
               **_peak_memory(art, how),
               metric=data.metric if data is not None else None, metric_value=m["metric"],
               model_flops=flops, achieved_gflops=gflops,
               peak_fraction=gflops / peak if gflops and peak else None,
               energy_mj_per_frame_estimate=power * lat["median"] if power and hw else None,
               intensity_flop_per_byte_estimate=flops / _model_bytes(model, meta) if flops else None,
               rewrites=info["rewrites"], tuning_db=meta.get("tuning_db"))
    row["status_text"] = STATUS_TEXT[row["status"]]
    return row


def _peak_memory(art: Path, how: Reached) -> dict[str, Any]:
    """Measured for runs on this host; a device behind RPC reports no memory figures."""
    if how.session_factory is not None:
        return {"peak_memory_bytes": None, "peak_memory_note": "not measurable through TVM RPC"}
    from ..bench.memory import peak_memory_bytes

    got = peak_memory_bytes(art)
    return {"peak_memory_bytes": got["peak_memory_bytes"], "peak_memory_note": got["note"]}


def _baseline_drops(rows: list[dict[str, Any]]) -> None:
    """Accuracy/mIoU drop of each variant against fp32 on the same device (points)."""
    base = {r["device_name"]: r.get("metric_value") for r in rows if r["variant"] == "fp32"}
    for r in rows:
        b, v = base.get(r["device_name"]), r.get("metric_value")
        r["metric_drop_points"] = 100 * (b - v) if b is not None and v is not None else None


# ---------------------------------------------------------------- figures
def _plots(rows: list[dict[str, Any]], out_dir: Path) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    timed = [r for r in rows if r.get("latency_ms")]
    devices = list(dict.fromkeys(r["device_name"] for r in rows))

    # 1. latency per device (and variant); emulated bars hatched and labelled
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, values, colors, hatches = [], [], [], []
    for r in timed:
        labels.append(f"{r['device_name']}\n{r['variant']}")
        values.append(r["latency_ms"]["median"])
        emu = r["status"] != "hardware"
        colors.append("#bbbbbb" if emu else "#1f77b4")
        hatches.append("//" if emu else "")
    bars = ax.bar(range(len(values)), values, color=colors)
    for b, h in zip(bars, hatches):
        b.set_hatch(h)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("median latency (ms)")
    kinds = sorted({r["status"] for r in timed})
    ax.set_title("Latency per device — " + "; ".join(STATUS_TEXT[k] for k in kinds) +
                 ("\n(hatched grey bars: emulated, not the board's speed)" if "emulated" in kinds else ""), fontsize=9)
    ax.set_yscale("log")
    figs.append(_save(fig, out_dir, "latency.png", "Latency per device",
                      ", ".join(STATUS_TEXT[k] for k in kinds) or "nothing measured"))

    # 2. accuracy-latency Pareto front of the variants, per device
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for d in devices:
        pts = [(r["latency_ms"]["median"], r["metric_value"], r["variant"], r["status"]) for r in timed
               if r["device_name"] == d and r.get("metric_value") is not None]
        if not pts:
            continue
        emu = any(p[3] != "hardware" for p in pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x" if emu else "o",
                   label=f"{d} ({'emulated' if emu else 'measured'})")
        for p in pts:
            ax.annotate(p[2], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], -1.0
        for p in sorted(pts):
            if p[1] > best:
                front.append(p)
                best = p[1]
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms)")
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title("Accuracy-latency Pareto front of the variants (dashed)\n"
                 "accuracy measured on each device; emulated latencies are not the board's", fontsize=9)
    figs.append(_save(fig, out_dir, "pareto.png", "Accuracy-latency Pareto front",
                      "accuracy measured; latency measured on hardware or emulated as marked"))

    # 3. roofline per device: description peaks; measured points only from hardware
    for d in devices:
        drows = [r for r in rows if r["device_name"] == d]
        peak, bw = drows[0].get("peak_gflops_fp32"), drows[0].get("mem_bandwidth_gbs")
        pts = [r for r in drows if r.get("achieved_gflops") and r.get("intensity_flop_per_byte_estimate")]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ai = np.logspace(-1, 3, 200)
        status = drows[0]["status"]
        if peak and bw:
            ax.plot(ai, np.minimum(peak, bw * ai), "k-", linewidth=1, label="description's roofline")
        elif peak:
            ax.axhline(peak, color="k", linewidth=1, label="description's peak")
        for r in pts:
            ax.scatter(r["intensity_flop_per_byte_estimate"], r["achieved_gflops"], zorder=3)
            ax.annotate(r["variant"], (r["intensity_flop_per_byte_estimate"], r["achieved_gflops"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity, FLOP/byte (estimate)")
        ax.set_ylabel("GFLOP/s")
        if not pts:
            why = {"emulated": "emulated: no device speed to place", "not measured": "not measured"}.get(
                status, "no peak figure for this device" if not peak else "no FLOP count")
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#a00")
        if peak or bw:
            ax.legend(fontsize=7)
        ax.set_title(f"Roofline: {d} — {STATUS_TEXT.get(status, status)}\n"
                     "peaks from the device description; points measured", fontsize=9)
        figs.append(_save(fig, out_dir, f"roofline-{d}.png", f"Roofline {d}", STATUS_TEXT.get(status, status)))
    plt.close("all")
    return figs


def _save(fig: Any, out_dir: Path, name: str, title: str, label: str) -> dict[str, str]:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    return {"file": name, "title": title, "label": label}


# ---------------------------------------------------------------- page
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _html(doc: dict[str, Any]) -> str:
    cols = [("device", lambda r: r["device_name"]), ("variant", lambda r: r["variant"]),
            ("status", lambda r: r["status_text"]),
            ("median ms", lambda r: (r.get("latency_ms") or {}).get("median")),
            ("p90 ms", lambda r: (r.get("latency_ms") or {}).get("p90")),
            ("FPS", lambda r: r.get("fps")), ("artifact bytes", lambda r: r.get("artifact_bytes")),
            ("peak memory", lambda r: r.get("peak_memory_bytes")),
            ("metric", lambda r: r.get("metric")), ("value", lambda r: r.get("metric_value")),
            ("drop (points)", lambda r: r.get("metric_drop_points")),
            ("energy/frame mJ (estimate)", lambda r: r.get("energy_mj_per_frame_estimate")),
            ("% of peak FP32", lambda r: None if r.get("peak_fraction") is None else 100 * r["peak_fraction"]),
            ("peak GFLOP/s (description)", lambda r: r.get("peak_gflops_fp32")),
            ("power W (description)", lambda r: r.get("power_w")),
            ("note", lambda r: r.get("error") or r.get("skipped") or r.get("note"))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = []
    for r in doc["rows"]:
        cls = html.escape(r["status"].replace(" ", "-"))
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{_fmt(f(r))}</td>" for _, f in cols) + "</tr>")
    figs = "".join(f'<figure><img src="{html.escape(f["file"])}" alt="{html.escape(f["title"])}">'
                   f'<figcaption>{html.escape(f["title"])} — <b>{html.escape(f["label"])}</b></figcaption></figure>'
                   for f in doc["figures"])
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(doc["created_unix"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tvmedge report: {html.escape(doc['model'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }} th {{ background: #eee; }}
tr.emulated td {{ color: #666; font-style: italic; }} tr.not-measured td {{ color: #999; }}
figure {{ display: inline-block; margin: 0.5em; }} figcaption {{ font-size: 12px; }}
</style></head><body>
<h1>tvmedge report: {html.escape(doc['model'])}</h1>
<p>{created}; devices {html.escape(', '.join(doc['devices']))}; variants {html.escape(', '.join(doc['variants']))};
evaluation data: {html.escape(str(doc['eval_data']))}.</p>
<p><b>measured on hardware</b>: timed on the device. <b>emulated</b>: a real TVM RPC server under qemu; its
outputs and accuracy are real, its timings are not the board's (no FPS, energy or peak fraction is derived
from them). <b>not measured</b>: only the device description's peak figures are shown. Energy per frame is an
estimate (description's power × latency); % of peak uses the graph's conv/matmul FLOPs.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{''.join(body)}
</tbody></table>
<h2>Figures</h2>
{figs}
<p>Machine-readable: <a href="report.json">report.json</a> (schema {html.escape(doc['schema'])}).</p>
</body></html>
"""
