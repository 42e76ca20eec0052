"""Per-call overhead of running `shell` in the bubblewrap sandbox (tools/sandbox.py), against
the same command with `--sandbox none`. Prints figures; asserts nothing.

    python bench/bench_sandbox.py [CALLS]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from loopstream.core.policy import Sandbox, SessionPolicy
from loopstream.tools import ToolContext
from loopstream.tools import sandbox as sb
from loopstream.tools.workspace import side_effect_registry


def per_call_ms(work: Path, mode: str, calls: int, network: bool = False) -> list[float]:
    ctx = ToolContext(workdir=work, policy=SessionPolicy(sandbox=Sandbox(mode=mode, network=network)))
    registry = side_effect_registry()
    registry.call("shell", {"command": "true"}, ctx)  # warm: the bwrap probe, caches
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        registry.call("shell", {"command": "true"}, ctx)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    print(f"bwrap: {sb.check()}; {calls} calls of `shell true` per mode")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        results = {}
        for mode, network in (("none", False), ("workspace-write", False), ("workspace-write", True),
                              ("read-only", False), ("full", False)):
            times = per_call_ms(work, mode, calls, network)
            label = f"{mode}{' +network' if network else ''}"
            results[label] = statistics.median(times)
            print(f"{label:26s} median {statistics.median(times):7.2f} ms   p90 "
                  f"{sorted(times)[int(len(times) * 0.9) - 1]:7.2f} ms")
        print(f"sandbox overhead per call (workspace-write - none): "
              f"{results['workspace-write'] - results['none']:.2f} ms")


if __name__ == "__main__":
    main()
