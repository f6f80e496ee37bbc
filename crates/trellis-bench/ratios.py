#!/usr/bin/env python3
"""Summarise the `layers` criterion benchmark as markdown tables.

Reads target/criterion/<group>/<contender>/new/estimates.json (written by
`cargo bench -p trellis-bench --features bench --bench layers`) and prints, per
group: each contender's mean time per call, its overhead over the `baseline`
(the bare inner service, driven the same way), and its ratio to Trellis
(peer time / Trellis time: above 1 means Trellis is faster).

Direct, synchronous APIs are compared with Trellis's direct API rather than its
layer: in `rate_limiter`, `governor` is compared with `trellis-check`.

Usage: python3 crates/trellis-bench/ratios.py [TARGET_DIR]
(TARGET_DIR defaults to $CARGO_TARGET_DIR or ./target, relative to the workspace.)
"""

import json
import os
import sys
from pathlib import Path

GROUPS = ["circuit_breaker", "bulkhead", "rate_limiter", "retry"]
# Display order; contenders not listed here follow in alphabetical order.
ORDER = [
    "baseline",
    "trellis",
    "trellis-no-budget",
    "trellis-check",
    "tower-resilience",
    "failsafe",
    "governor",
    "tower",
]
# Which Trellis measurement a contender is compared with (default: "trellis").
REFERENCE = {
    "governor": "trellis-check",
    "trellis-check": "trellis-check",
}
# Contenders that call an API directly, without the inner service: no baseline applies.
DIRECT = {"governor", "trellis-check"}


def workspace_root() -> Path:
    # This file lives in <root>/crates/trellis-bench/.
    return Path(__file__).resolve().parent.parent.parent


def target_dir() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return Path(env)
    return workspace_root() / "target"


def load(group_dir: Path) -> dict:
    """contender -> (mean ns, lower ns, upper ns) of the mean's confidence interval."""
    results = {}
    if not group_dir.is_dir():
        return results
    for bench in sorted(group_dir.iterdir()):
        estimates = bench / "new" / "estimates.json"
        if not estimates.is_file():
            continue
        # Criterion sanitises ids for directory names; benchmark.json has the real one.
        name = bench.name
        meta = bench / "new" / "benchmark.json"
        if meta.is_file():
            with meta.open() as f:
                name = json.load(f).get("function_id") or name
        with estimates.open() as f:
            mean = json.load(f)["mean"]
        ci = mean["confidence_interval"]
        results[name] = (mean["point_estimate"], ci["lower_bound"], ci["upper_bound"])
    return results


def order_key(name: str):
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def fmt_ns(ns: float) -> str:
    return f"{ns:,.1f}"


def table(group: str, results: dict) -> str:
    baseline = results.get("baseline", (None,))[0]
    lines = [
        f"### {group}",
        "",
        "| contender | mean ns/call (95% CI) | overhead ns over baseline | vs | ratio (peer / trellis) |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name in sorted(results, key=order_key):
        mean, low, high = results[name]
        if name == "baseline" or name in DIRECT or baseline is None:
            overhead = "—"
        else:
            overhead = fmt_ns(mean - baseline)
        reference = REFERENCE.get(name, "trellis")
        if name == "baseline" or reference not in results:
            vs, ratio = "—", "—"
        elif name == reference:
            vs, ratio = "(reference)", "1.00"
        else:
            vs, ratio = reference, f"{mean / results[reference][0]:.2f}"
        lines.append(
            f"| {name} | {fmt_ns(mean)} ({fmt_ns(low)}–{fmt_ns(high)}) | {overhead} | {vs} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    root = target_dir() / "criterion"
    found = False
    for group in GROUPS:
        results = load(root / group)
        if not results:
            print(f"### {group}\n\n(no results under {root / group})\n")
            continue
        found = True
        print(table(group, results))
        print()
    if not found:
        print(
            "No criterion results found; run "
            "`cargo bench -p trellis-bench --features bench --bench layers` first.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
