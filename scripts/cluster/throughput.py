"""Throughput of stock Beam's RunInference against beam-turbo's on the started cluster
(scripts/cluster.sh start flink|spark), by ``beam-turbo bench e2e``'s method: the same
pipelines (elements generated inside the pipeline), timed as the slope between a small and a
large run so that job start-up cancels out, the median over rounds.

    .cluster/worker-venv/bin/python scripts/cluster/throughput.py --frameworks sklearn torch

Prints a table and one JSON line per framework.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.cluster.conftest import Cluster, running_runner, settings  # noqa: E402

from beam_turbo.bench import e2e  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", default=["sklearn", "torch"])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    runner = running_runner()
    if runner is None:
        sys.exit("no cluster is started: scripts/cluster.sh start flink|spark")
    options = Cluster(runner, settings()).options()
    rows = []
    for name in args.frameworks:
        with tempfile.TemporaryDirectory(prefix="throughput-") as folder:
            framework = e2e.make_framework(name, folder)
            secs = {
                which: e2e.per_element_secs(
                    framework, which, args.small, args.large, args.rounds, options
                )
                for which in ("stock", "turbo")
            }
        row = {
            "runner": runner,
            "framework": name,
            "small": args.small,
            "large": args.large,
            "rounds": args.rounds,
            "stock_elements_per_sec": round(1 / secs["stock"]),
            "turbo_elements_per_sec": round(1 / secs["turbo"]),
            "speedup": round(secs["stock"] / secs["turbo"], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'framework':<10} {'stock el/s':>12} {'turbo el/s':>12} {'speed-up':>9}  ({runner})")
    for row in rows:
        print(
            f"{row['framework']:<10} {row['stock_elements_per_sec']:>12,} "
            f"{row['turbo_elements_per_sec']:>12,} {row['speedup']:>8}x"
        )


if __name__ == "__main__":
    main()
