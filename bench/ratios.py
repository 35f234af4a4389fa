"""Print each benchmark's median as a ratio to the baselines of its group (same run).

Usage: python bench/ratios.py bench/latest.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        name = b["name"].split("[")[0].replace("test_", "")
        groups[b["group"]][name] = b["stats"]["median"]
    machine = data.get("machine_info", {})
    print(f"# {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '')}")
    print("| group | kernel | median ms | / clone() | speed-up vs pure torch |")
    print("|---|---|---:|---:|---:|")
    for group, entries in sorted(groups.items()):
        clone = next((v for k, v in entries.items() if k.endswith("_clone")), None)
        torch_ref = next((v for k, v in entries.items() if k.endswith("_torch")), None)
        for name, median in sorted(entries.items()):
            if name.endswith("_clone") or name.endswith("_torch"):
                ratio = ""
            else:
                ratio = f"{median / clone:.2f}x" if clone else "-"
            speedup = f"{torch_ref / median:.1f}x" if torch_ref and not name.endswith("_torch") else ""
            print(f"| {group} | {name} | {median * 1e3:.2f} | {ratio} | {speedup} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/latest.json")
