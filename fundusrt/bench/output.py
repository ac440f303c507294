"""Writing a bench document: JSON (machine-readable), a markdown table, and the latency/accuracy Pareto plot."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fundusrt.bench.measure import primary_value
from fundusrt.manifest import atomic_write_bytes, atomic_write_text

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "bench.json", "bench.md", "pareto.png"
_COLUMNS = ("package", "backend", "eval set", "accuracy", "e2e p50 ms", "p95", "p99", "DICOM ms", "patch ms",
            "vision ms", "conn. ms", "TTFT ms", "tok/s", "decode eff.", "peak RSS MiB", "GPU MiB",
            "e2e vs base", "tok/s vs base")


def measured_rows(doc: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(label, backend, eval set, set data, config) for the baseline and every measured config."""
    entries = ([doc["baseline"]] if doc.get("baseline") and "sets" in doc["baseline"] else []) + [
        c for c in doc["configs"] if c.get("status") == "ok"]
    for config in entries:
        package = config.get("package")
        label = f"{package['name']} ({package['precision']})" if package else config["info"]["name"]
        for name, data in config["sets"].items():
            yield label, config["backend"], name, data, config


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy(data: dict[str, Any]) -> tuple[str, float | None]:
    accuracy = data.get("accuracy", {})
    if not accuracy.get("primary"):
        return "-", None
    value = primary_value(accuracy)
    return f"{accuracy['primary']} {value:.3f}", value


def render_markdown(doc: dict[str, Any]) -> str:
    """The bench as a markdown document: machine, one table row per config x eval set, what did not run."""
    hw, bw = doc["hardware"], doc["memory_bandwidth"]
    lines = [f"# fundusrt bench ({doc['started']})", "",
             f"- machine: {hw['cpu']}, {hw['usable_cores']} usable cores, {hw['memory_gib']} GiB; GPUs: "
             + (", ".join(g["name"] for g in hw["gpus"]) or "none"),
             f"- memory bandwidth: host {bw['host_bytes_per_s'] / 1e9:.1f} GB/s ({bw['host_method']}); GPU "
             + (f"{bw['gpu_bytes_per_s'] / 1e9:.0f} GB/s" if bw["gpu_bytes_per_s"] else bw["gpu_method"]),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
             "- settings: " + ", ".join(f"{k}={v}" for k, v in doc["settings"].items()),
             "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for label, backend, name, data, config in measured_rows(doc):
        if "error" in data:
            lines.append(f"| {label} | {backend} | {name} | error: {data['error']} |" + " |" * (len(_COLUMNS) - 4))
            continue
        if "skipped" in data:
            lines.append(f"| {label} | {backend} | {name} | skipped: {data['skipped']} |" + " |" * (len(_COLUMNS) - 4))
            continue
        latency, stages = data["latency"], data["latency"]["stages"]
        e2e, ratios = latency["e2e_ms"], data.get("vs_baseline", {})
        efficiency = data.get("roofline", {}).get("efficiency")
        cells = [label, backend, name, _accuracy(data)[0], _fmt(e2e["p50"]), _fmt(e2e["p95"]), _fmt(e2e["p99"]),
                 _fmt(stages["dicom_ms"]), _fmt(stages["patchify_ms"]), _fmt(stages["vision_ms"]),
                 _fmt(stages["connector_ms"]), _fmt(stages["ttft_ms"]), _fmt(stages["decode_tok_s"]),
                 "-" if efficiency is None else f"{100 * efficiency:.1f}%", _fmt(config.get("peak_rss_mib"), 0),
                 _fmt(config.get("peak_gpu_memory_mib"), 0),
                 "-" if ratios.get("e2e_speedup") is None else f"{ratios['e2e_speedup']:.2f}x",
                 "-" if ratios.get("decode_tok_s_ratio") is None else f"{ratios['decode_tok_s_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [c for c in doc["configs"] if c.get("status") != "ok"]
    if doc.get("baseline") and "error" in doc["baseline"]:
        skipped.insert(0, {"package": None, "backend": doc["baseline"]["backend"], "status": "error",
                           "error": doc["baseline"]["error"]})
    if skipped:
        lines += ["", "Not measured:"]
        for c in skipped:
            who = f"{c['package']['name']} on {c['backend']}" if c.get("package") else c["backend"]
            lines.append(f"- {who}: {c['status']}: {c.get('reason') or c.get('error')}")
    lines += _screening_lines(doc.get("screening", []))
    lines += ["", "Accuracy is each set's primary metric; e2e is per image (per study for DICOM studies); "
              "decode eff. = bytes per token x tok/s / memory bandwidth; ratios are to the baseline."]
    return "\n".join(lines) + "\n"


def _screening_lines(entries: list[dict[str, Any]]) -> list[str]:
    """Per package, its protocol's items on held-out synthetic cases (fundusrt.bench.screening)."""
    def fmt(p: dict[str, Any] | None) -> str:
        return "-" if p is None else f"{p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"

    lines = []
    for entry in entries:
        protocol = entry["protocol"]
        lines += ["", f"Screening protocol {protocol['name']} {protocol['version']} of {entry['package']} on "
                      f"{entry['count']} held-out synthetic cases (seeds from {entry['first_seed']}; pixel gate passed "
                      f"{entry['pixel_gradable']}; {entry['mean_scoring_ms_per_image']:.0f} ms per image), "
                      "95% CIs:", "",
                  "| item | accuracy | AUC | threshold | sensitivity | specificity |", "|---|---|---|---|---|---|"]
        for item_id, figures in entry["items"].items():
            threshold = f"{figures['threshold']:.3f}" if "threshold" in figures else "-"
            lines.append(f"| {item_id} | {fmt(figures['accuracy'])} | {fmt(figures.get('auc'))} | {threshold} | "
                         f"{fmt(figures.get('sensitivity'))} | {fmt(figures.get('specificity'))} |")
    return lines


def render_pareto_png(doc: dict[str, Any]) -> bytes:
    """PNG of latency (e2e p50) against accuracy: one panel per eval set, one point per package x backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[str, float, float]]] = {}
    for label, backend, name, data, _ in measured_rows(doc):
        value = _accuracy(data)[1] if "latency" in data else None
        if value is not None:
            points.setdefault(name, []).append((f"{label} / {backend}", data["latency"]["e2e_ms"]["p50"], value))
    panels = sorted(points) or ["(no measurements)"]
    configs = sorted({label for entries in points.values() for label, _, _ in entries})
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(configs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        entries = points.get(name, [])
        for label, latency, value in entries:
            ax.scatter(latency, value, s=50, color=colours[label], label=label, zorder=3)
        # The frontier: each point that no other point beats on both latency and accuracy.
        frontier = sorted((lat, val) for _, lat, val in entries
                          if not any(l2 <= lat and v2 >= val and (l2, v2) != (lat, val) for _, l2, v2 in entries))
        if len(frontier) > 1:
            ax.plot(*zip(*frontier, strict=True), linestyle="--", linewidth=1, color="grey", zorder=2)
        latencies = [lat for _, lat, _ in entries]
        if latencies and max(latencies) > 10 * min(latencies):
            ax.set_xscale("log")  # packages that differ by orders of magnitude
        elif latencies:
            ax.set_xlim(0, 1.15 * max(latencies))
        ax.set_ylim(-0.03, 1.03)  # every primary metric is a fraction
        ax.set_xlabel("end-to-end latency p50 (ms)")
        ax.set_ylabel("accuracy (primary metric)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
    if configs:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c]) for c in configs]
        fig.legend(handles, configs, loc="lower center", ncol=min(3, len(configs)), fontsize=8, frameon=False)
        fig.subplots_adjust(bottom=0.2 + 0.05 * ((len(configs) - 1) // 3))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and pareto.png into `out_dir` (atomically) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME, "plot": out / PLOT_NAME}
    atomic_write_text(paths["json"], json.dumps(doc, indent=1, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(doc))
    atomic_write_bytes(paths["plot"], render_pareto_png(doc))
    return paths
