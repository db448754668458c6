"""``tvmedge report``: the page and JSON for shapes-seg on this host (measured) and a Jetson
(not measured), rendered in headless Chromium with every image loaded; and (slow) host plus
an emulated Raspberry Pi 4 with int8, every figure labelled."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tvmedge.core.schema import validate

from conftest import run_cli


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page, tmp_path) -> dict:
    """Load ``page`` in headless Chromium; what the browser saw: images loaded, tables, text."""
    probe = tmp_path / "probe.html"
    probe.write_text(f"""<!DOCTYPE html><html><body><pre id="out">pending</pre>
<iframe id="f" src="{page.as_uri()}" width="1200" height="900"></iframe>
<script>
document.getElementById("f").addEventListener("load", () => {{
  const doc = document.getElementById("f").contentDocument;
  const imgs = Array.from(doc.images);
  const check = () => {{
    if (!imgs.every(i => i.complete)) {{ setTimeout(check, 50); return; }}
    document.getElementById("out").textContent = JSON.stringify({{
      images: imgs.length, loaded: imgs.filter(i => i.naturalWidth > 0).length,
      tables: doc.querySelectorAll("table").length, rows: doc.querySelectorAll("tbody tr").length,
      captions: Array.from(doc.querySelectorAll("figcaption")).map(c => c.textContent),
      title: doc.title}});
  }};
  check();
}});
</script></body></html>""")
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import html
    import re

    m = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1) != "pending", proc.stdout[-2000:]
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.slow  # compiles and evaluates shapes-seg (~20 s of CPU): over the default run's budget
def test_report_host_and_unreachable_jetson(tmp_path):
    out = tmp_path / "report"
    proc = run_cli("report", "shapes-seg", "--devices", "host,jetson-nano", "--variants", "fp32",
                   "--repeat", "5", "--eval-samples", "16", "-o", str(out), in_process=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "report.json").read_text())
    validate(doc)
    assert doc["command"] == "report"
    host, nano = doc["rows"]
    assert host["status"] == "hardware" and host["device"]["kind"] == "hardware"
    assert host["latency_ms"]["runs"] == 5 and host["fps"] > 0 and host["artifact_bytes"] > 0
    assert host["metric"] == "miou" and host["metric_value"] > 0.7 and host["metric_drop_points"] == 0
    assert host["energy_mj_per_frame_estimate"] is None  # the host description has no power figure
    # a device nobody can reach: the description's peaks, nothing else
    assert nano["status"] == "not measured" and nano["peak_gflops_fp32"] == 236.0
    assert "latency_ms" not in nano and "fps" not in nano
    assert {f["file"] for f in doc["figures"]} == {"latency.png", "pareto.png", "roofline-host.png",
                                                   "roofline-jetson-nano.png"}
    if chromium() is None:
        pytest.skip("chromium not installed (scripts/setup.sh installs it): page not rendered")
    seen = render(out / "index.html", tmp_path)
    assert seen["images"] == seen["loaded"] == 4
    assert seen["tables"] == 1 and seen["rows"] == 2 and seen["title"] == "tvmedge report: shapes-seg"
    assert any("not measured" in c for c in seen["captions"])
    assert any("measured on hardware" in c for c in seen["captions"])


def test_report_bad_input_is_one_line(tmp_path):
    proc = run_cli("report", "shapes-seg", "--devices", "host,nosuchboard", "-o", str(tmp_path / "r"),
                   in_process=True)
    assert proc.returncode == 1 and "nosuchboard" in proc.stderr
    proc = run_cli("report", "shapes-seg", "--variants", "fp64", "-o", str(tmp_path / "r"), in_process=True)
    assert proc.returncode == 1 and "unknown variant 'fp64'" in proc.stderr


@pytest.mark.slow
def test_report_host_and_emulated_pi4(tmp_path):
    out = tmp_path / "report"
    proc = run_cli("report", "shapes-seg", "--devices", "host,pi4", "--variants", "fp32,int8",
                   "--repeat", "3", "--eval-samples", "8", "-o", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "report.json").read_text())
    validate(doc)
    rows = {(r["device_name"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {("host", "fp32"), ("host", "int8"), ("pi4", "fp32"), ("pi4", "int8")}
    for v in ("fp32", "int8"):
        pi = rows[("pi4", v)]
        assert pi["status"] == "emulated" and pi["device"]["kind"] == "emulated", pi
        # emulated: outputs (accuracy) are real, timings are not the board's: nothing derived from them
        assert pi["metric_value"] > 0.5 and pi["latency_ms"]["runs"] == 3
        assert pi["fps"] is None and pi["energy_mj_per_frame_estimate"] is None and pi["peak_fraction"] is None
        assert rows[("host", v)]["status"] == "hardware"
    assert rows[("pi4", "int8")]["metric_drop_points"] is not None
    labels = {f["file"]: f["label"] for f in doc["figures"]}
    assert "emulated" in labels["roofline-pi4.png"] and "emulated" in labels["latency.png"]
    if chromium() is None:
        pytest.skip("chromium not installed (scripts/setup.sh installs it): page not rendered")
    seen = render(out / "index.html", tmp_path)
    assert seen["images"] == seen["loaded"] == len(doc["figures"]) and seen["rows"] == 4
