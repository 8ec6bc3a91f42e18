"""Renders a test_bench_stream.py JSON file: throughput per request size, the stream against
per-request ``compact`` and against the best fixed-batch ``compact``, and its efficiency.

    python -m benchmarks.stream_table benchmarks/results/cpu-stream.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows_of(path: str) -> dict[str, list[dict]]:
    results = defaultdict(list)
    for b in json.load(open(path))["benchmarks"]:
        results[b["extra_info"]["model"]].append(b["extra_info"])
    return results


def table(entries: list[dict]) -> list[str]:
    compact = {e["request_size"]: e["samples_per_second"] for e in entries if e["kind"] == "compact"}
    plain = {e["request_size"]: e["samples_per_second"] for e in entries if e["kind"] == "plain"}
    stream = defaultdict(dict)
    for e in entries:
        if e["kind"] == "stream":
            stream[e["request_size"]][e["segment_batch"]] = e
    best_fixed = max(compact.values())
    segments = sorted({b for per in stream.values() for b in per})
    lines = [
        f"exits {entries[0]['exit_counts']}, {entries[0]['samples']} samples; best fixed-batch compact: "
        f"{best_fixed:.0f} samples/s (batch {max(compact, key=compact.get)})",
        "",
        "| request | plain | compact per request | " + " | ".join(f"stream, segments of {b}" for b in segments)
        + " | best stream / compact per request | best stream / best fixed compact |",
        "|---|---|---|" + "---|" * len(segments) + "---|---|",
    ]
    for r in sorted(stream):
        cells = [f"{stream[r][b]['samples_per_second']:.0f} (eff. {stream[r][b]['efficiency']:.2f})" for b in segments]
        best = max(e["samples_per_second"] for e in stream[r].values())
        lines.append(f"| {r} | {plain.get(r, float('nan')):.0f} | {compact[r]:.0f} | " + " | ".join(cells)
                     + f" | {best / compact[r]:.2f}x | {best / best_fixed:.2f} |")
    return lines


def main(path: str) -> None:
    for model, entries in rows_of(path).items():
        info = entries[0]
        print(f"## {model} ({info['device']}, {info['dtype']}, torch {info['torch']}, eefast {info['eefast']})")
        print("\n".join(table(entries)))
        print()


if __name__ == "__main__":
    main(sys.argv[1])
