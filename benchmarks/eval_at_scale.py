"""retrieval_metrics at MSCOCO-5K scale stays within O(chunk_size x N) extra memory.

25,000 captions x 5,000 images (d = 256, 5 captions per image) by default. Each chunk size runs in
a fresh Python process, so one run's freed-but-cached heap never hides the next run's peak. Per
chunk size it reports the median wall time over --repeats runs and the peak extra memory over all
of them: resident set size sampled every --interval-ms by a background thread from
/proc/self/statm (CPU), or torch.cuda.max_memory_allocated (CUDA), minus the baseline taken once
the embeddings exist. On CPU, Linux's VmHWM (reset through /proc/self/clear_refs) gives an exact
peak to hold the sampled one against. The last default chunk size, 25,000, scores everything in
one chunk: the unchunked N_txt x N_img computation, for comparison.

    .venv/bin/python benchmarks/eval_at_scale.py --out out/eval_at_scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.evaluate import retrieval_metrics

MB = 1024**2


@dataclass(frozen=True)
class Workload:
    n_images: int
    captions_per_image: int
    dim: int
    noise: float
    seed: int

    @property
    def n_captions(self) -> int:
        return self.n_images * self.captions_per_image


def make_embeddings(work: Workload, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions are noisy copies of their image (noise chosen so R@1 is far from 0 and 100)."""
    gen = torch.Generator().manual_seed(work.seed)
    image = F.normalize(torch.randn(work.n_images, work.dim, generator=gen), dim=1)
    ids = torch.arange(work.n_images).repeat_interleave(work.captions_per_image)
    ids = ids[torch.randperm(len(ids), generator=gen)]
    noise = torch.randn(len(ids), work.dim, generator=gen) * work.noise / work.dim**0.5
    text = F.normalize(image[ids] + noise, dim=1)
    return image.to(device), text.to(device), ids.to(device)


def release_free_heap() -> None:
    """Hand memory that glibc holds free back to the OS, so the baseline RSS is live memory."""
    # Not glibc: nothing to trim; the fixed mmap threshold set by the parent still applies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class RssSampler:
    """Highest RSS seen by a background thread polling /proc/self/statm."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(work: Workload, chunk_size: int, device: str, repeats: int, interval_ms: float) -> dict:
    """One chunk size, in this process. The first run is watched for peak memory; the next
    ``repeats`` runs are timed with no sampler competing for the CPU."""
    image, text, ids = make_embeddings(work, device)
    # Warm-up on a slice: thread pools, kernels and allocator arenas exist before the baseline.
    retrieval_metrics(image[:50], text[ids < 50], ids[ids < 50], chunk_size=min(chunk_size, 64))
    cuda = device.startswith("cuda")
    result: dict = {"chunk_size": chunk_size}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        metrics = retrieval_metrics(image, text, ids, chunk_size=chunk_size)
        torch.cuda.synchronize()
        result["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - baseline) / MB
        result["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        release_free_heap()
        baseline = rss_bytes()
        hwm_ok = reset_hwm()
        with RssSampler(interval_ms / 1000) as sampler:
            metrics = retrieval_metrics(image, text, ids, chunk_size=chunk_size)
        result["peak_extra_mb"] = (sampler.peak - baseline) / MB
        result["peak_source"] = f"RSS sampled every {interval_ms} ms"
        result["hwm_extra_mb"] = (hwm_bytes() - baseline) / MB if hwm_ok else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        again = retrieval_metrics(image, text, ids, chunk_size=chunk_size)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if again != metrics:
            raise RuntimeError(f"chunk_size {chunk_size}: metrics changed between runs")
    result |= {"wall_s_median": statistics.median(times), "wall_s_all": times, "metrics": metrics}
    return result


def theoretical_mb(work: Workload, chunk_size: int) -> float:
    """The largest score block alive at once: a caption chunk x N_img or an image chunk x N_txt,
    float32 (retrieval_metrics writes its comparison flags into that block in place)."""
    t2i = min(chunk_size, work.n_captions) * work.n_images
    i2t = min(chunk_size, work.n_images) * work.n_captions
    return 4 * max(t2i, i2t) / MB


def run_in_subprocess(args: argparse.Namespace, chunk_size: int) -> dict:
    command = [sys.executable, __file__, "--worker-chunk", str(chunk_size)]
    names = (
        "n_images",
        "captions_per_image",
        "dim",
        "noise",
        "seed",
        "device",
        "repeats",
        "threads",
    )
    for name in names:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--interval-ms", str(args.interval_ms)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(work: Workload, rows: list[dict]) -> str:
    full = 4 * work.n_captions * work.n_images / MB
    lines = [
        f"retrieval_metrics, {work.n_captions:,} captions x {work.n_images:,} images, "
        f"d={work.dim}; full N_txt x N_img float32 matrix = {full:.1f} MB",
        "",
        "| chunk_size | wall s (median) | peak extra MB | VmHWM extra MB | largest block MB "
        "(theory) | peak / full matrix | t2i_R1 | i2t_R1 | rsum |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        hwm = row.get("hwm_extra_mb")
        lines.append(
            f"| {row['chunk_size']} | {row['wall_s_median']:.3f} | {row['peak_extra_mb']:.1f} "
            f"| {'-' if hwm is None else f'{hwm:.1f}'} | {row['theoretical_block_mb']:.1f} "
            f"| {row['peak_extra_mb'] / full:.3f} | {row['metrics']['t2i_R1']:.2f} "
            f"| {row['metrics']['i2t_R1']:.2f} | {row['metrics']['rsum']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--noise", type=float, default=4.0, help="caption noise scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 4096, 25000])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--interval-ms", type=float, default=0.5, help="RSS sampling period")
    parser.add_argument("--out", type=Path, default=Path("out/eval_at_scale.json"))
    parser.add_argument("--worker-chunk", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Workload(args.n_images, args.captions_per_image, args.dim, args.noise, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_chunk is not None:
        result = measure(work, args.worker_chunk, args.device, args.repeats, args.interval_ms)
        print(json.dumps(result))
        return 0
    rows = []
    for chunk_size in args.chunk_sizes:
        row = run_in_subprocess(args, chunk_size)
        row["theoretical_block_mb"] = theoretical_mb(work, chunk_size)
        rows.append(row)
    same = all(row["metrics"] == rows[0]["metrics"] for row in rows)
    print(markdown_table(work, rows))
    print(f"\nidentical metrics for every chunk size: {same}")
    report = {
        "benchmark": "eval_at_scale",
        "workload": asdict(work) | {"n_captions": work.n_captions},
        "full_matrix_mb": 4 * work.n_captions * work.n_images / MB,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "identical_metrics": same,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
