"""Print each benchmark's median as a ratio to the baselines of its group (same run).

In a group, the benchmark whose function name ends in ``_clone`` is the memory-traffic
baseline and the one ending in ``_torch`` is the pure-torch way of doing the same work.

Usage: python bench/ratios.py bench/latest.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
    for b in data["benchmarks"]:
        function = b["name"].split("[")[0].replace("test_", "")
        label = b["name"].replace("test_", "")
        groups[b["group"]][label] = (function.rsplit("_", 1)[-1], b["stats"]["median"])
    machine = data.get("machine_info", {})
    print(f"# {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '')}")
    print("| group | kernel | median ms | / clone() | speed-up vs pure torch |")
    print("|---|---|---:|---:|---:|")
    for group, entries in sorted(groups.items()):
        clone = next((t for kind, t in entries.values() if kind == "clone"), None)
        torch_ref = next((t for kind, t in entries.values() if kind == "torch"), None)
        for label, (kind, median) in sorted(entries.items()):
            baseline = kind in ("clone", "torch")
            ratio = f"{median / clone:.2f}x" if clone and not baseline else ""
            speedup = f"{torch_ref / median:.1f}x" if torch_ref and not baseline else ""
            print(f"| {group} | {label} | {median * 1e3:.2f} | {ratio} | {speedup} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/latest.json")
