"""Print each benchmark's median as a ratio to the baselines of its group (same run).

In a group, the benchmark whose function name ends in ``_clone`` is the memory-traffic
baseline and the one ending in ``_torch`` is the pure-torch way of doing the same work.

Usage: python bench/ratios.py bench/latest.json
"""

import json
import sys
from collections import defaultdict


def ratio_rows(data: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark JSON: group, kernel, median (s), its ratio to the
    group's ``_clone`` baseline and the ``_torch`` baseline's median over it (None for the
    baselines themselves and where a group lacks one)."""
    groups: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
    for b in data["benchmarks"]:
        function = b["name"].split("[")[0].replace("test_", "")
        label = b["name"].replace("test_", "")
        groups[b["group"]][label] = (function.rsplit("_", 1)[-1], b["stats"]["median"])
    rows = []
    for group, entries in sorted(groups.items()):
        clone = next((t for kind, t in entries.values() if kind == "clone"), None)
        torch_ref = next((t for kind, t in entries.values() if kind == "torch"), None)
        for label, (kind, median) in sorted(entries.items()):
            baseline = kind in ("clone", "torch")
            rows.append({"group": group, "kernel": label, "median_s": median,
                         "vs_clone": median / clone if clone and not baseline else None,
                         "speedup_vs_torch": torch_ref / median if torch_ref and not baseline else None})
    return rows


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    print(f"# {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '')}")
    print("| group | kernel | median ms | / clone() | speed-up vs pure torch |")
    print("|---|---|---:|---:|---:|")
    for row in ratio_rows(data):
        ratio = f"{row['vs_clone']:.2f}x" if row["vs_clone"] is not None else ""
        speedup = f"{row['speedup_vs_torch']:.1f}x" if row["speedup_vs_torch"] is not None else ""
        print(f"| {row['group']} | {row['kernel']} | {row['median_s'] * 1e3:.2f} | {ratio} | {speedup} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/latest.json")
