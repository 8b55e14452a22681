"""Host-to-device bandwidth against what the GPU's PCIe link gives (scripts/gpu-check.sh).

Copies of 256 MiB: pinned host memory to the device (what beam-turbo's staging does), pageable
host memory to the device, and the device to pinned host memory; the best and the median of 10
copies each, in GB/s (10^9 bytes). The link's rate is its generation's per-lane rate after line
encoding times its width (``nvidia-smi``), before packet overheads, which take 10-20% of it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

#: GB/s per lane and direction after line encoding, by PCIe generation.
PER_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
SIZE = 256 << 20
COPIES = 10


def link() -> dict[str, int]:
    """The GPU's PCIe link, current and maximum generation and width."""
    fields = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"
    line = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()[0]
    names = ("gen", "width", "gen_max", "width_max")
    return dict(zip(names, (int(v) for v in line.split(",")), strict=True))


def timed_copies(copy: object) -> tuple[float, float]:
    """Best and median GB/s of ``COPIES`` calls of ``copy`` (after one to warm up)."""
    import torch

    assert callable(copy)
    copy()
    torch.cuda.synchronize()
    rates = []
    for _ in range(COPIES):
        start = time.perf_counter()
        copy()
        torch.cuda.synchronize()
        rates.append(SIZE / (time.perf_counter() - start) / 1e9)
    return max(rates), statistics.median(rates)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    pinned = torch.empty(SIZE, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(SIZE, dtype=torch.uint8)
    device = torch.empty(SIZE, dtype=torch.uint8, device="cuda")
    back = torch.empty(SIZE, dtype=torch.uint8, pin_memory=True)
    measured = {
        "host to device, pinned": timed_copies(lambda: device.copy_(pinned, non_blocking=True)),
        "host to device, pageable": timed_copies(lambda: device.copy_(pageable)),
        "device to host, pinned": timed_copies(lambda: back.copy_(device, non_blocking=True)),
    }
    found = link()  # after the copies: an idle link may have dropped to a lower generation
    rate = PER_LANE_GBPS.get(found["gen"], float("nan")) * found["width"]
    top = PER_LANE_GBPS.get(found["gen_max"], float("nan")) * found["width_max"]
    print(f"{torch.cuda.get_device_name()}: copies of {SIZE >> 20} MiB, best / median of {COPIES}")
    print(
        f"PCIe link: gen {found['gen']} x{found['width']} now ({rate:.1f} GB/s a direction), "
        f"gen {found['gen_max']} x{found['width_max']} at most ({top:.1f} GB/s)\n"
    )
    print("| copy | best GB/s | median GB/s | best / the link now |")
    print("| --- | ---: | ---: | ---: |")
    for name, (best, median) in measured.items():
        print(f"| {name} | {best:.1f} | {median:.1f} | {best / rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
