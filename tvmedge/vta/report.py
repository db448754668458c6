"""Plain-text lines saying where each layer of a VTA compile went (for ``tvmedge compile``)."""

from __future__ import annotations

import sys
from typing import Any


def offload_lines(info: dict[str, Any]) -> list[str]:
    """The report of :func:`tvmedge.vta.offload.offload` as lines of text."""
    lines = []
    if info.get("warning"):
        lines.append(f"warning: {info['warning']}")
    n = len(info["offloaded"])
    lines.append(f"{info['accelerator']} (SIMULATED): {n} layer(s) offloaded, {len(info['on_cpu'])} on the host CPU; "
                 f"estimated accelerator time {info['accelerator_ms']:.3f} ms at {info['clock_mhz']:g} MHz, "
                 f"{info['bytes_moved'] / 1e3:.1f} kB moved")
    for row in info["layers"]:
        if row["where"] == "cpu":
            lines.append(f"  {row['layer']:<12} cpu   {row['reason']}")
        else:
            t, e = row["tiling"], row["estimate"]
            lines.append(f"  {row['layer']:<12} {row['where']}  tile {t['tile_h']}x{t['tile_w']}x{t['tile_co']}blk"
                         f"{' db' if t['double_buffer'] else ''}{' (tuned)' if row.get('tuned') else ''}: "
                         f"{e['cycles']} cycles, GEMM util {100 * e['gemm_utilisation']:.1f}%")
    lines.append(f"note: {info['note']}")
    return lines


def print_offload(info: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    for line in offload_lines(info):
        print(line, file=sys.stderr if line.startswith("warning:") else out)
