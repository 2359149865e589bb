"""Benchmark dipgo's block-sparse linear against the dense paths (MKL F.linear, oneDNN) and torch's BSR.

Speed-ups are quoted against the fastest dense path. The kernel's ISA is the CPU's best unless
DIPGO_KERNEL_ISA=avx2|avx512 says otherwise (the JSON records it, with the CPU's model and flags);
ATEN_CPU_CAPABILITY=avx2 makes torch take its AVX2 kernels.

For every (tokens, layer, sparsity) point the variants are timed interleaved in this
process (medians), ours is checked against a float64 reference, and everything is written to
one JSON (machine, torch version, threads, load average and the CPU share other jobs use, before
and after: timings on a shared machine mean little when that share is high). Defaults are GitHub
issue 5's targets: Linear 768->3072 and 3072->768 at 256 and 2048 tokens, 2 threads, 50/70/90%
block sparsity (plus 0%: the kernel on a dense pattern).

    python scripts/bench_kernels.py --threads 2 --out docs/results/kernels.json
    DIPGO_KERNEL_ISA=avx2 python scripts/bench_kernels.py --threads 2 --out docs/results/kernels_avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dipgo.kernels import bench
from dipgo.kernels.layout import ACTIVATIONS, DEFAULT_BLOCK

ENV_VARS = ("DIPGO_KERNEL_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment settings that change what is timed; the recorded command repeats them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads while timing (default 2)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(bench.DEFAULT_TOKENS))
    p.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in bench.DEFAULT_SHAPES],
                   help="layers as IN x OUT, e.g. 768x3072")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(bench.DEFAULT_SPARSITIES))
    p.add_argument("--block", type=int, nargs=2, default=list(DEFAULT_BLOCK), metavar=("ROWS", "COLS"))
    p.add_argument("--activation", choices=ACTIVATIONS, default="none")
    p.add_argument("--runs", type=int, default=10, help="timed calls per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each rotating the variant order")
    p.add_argument("--no-bsr", action="store_true", help="skip torch's BSR variant")
    p.add_argument("--out", default="docs/results/kernels.json")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    try:
        i, o = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: shape {text!r} is not IN x OUT (e.g. 768x3072)") from None
    return i, o


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [_shape(s) for s in args.shapes]
    if args.threads < 1:
        raise SystemExit("error: --threads must be >= 1")
    torch.set_num_threads(args.threads)
    info = bench.machine_info()
    rows = []
    t0 = time.perf_counter()
    for tokens in args.tokens:
        for in_f, out_f in shapes:
            for s in args.sparsities:
                try:
                    row = bench.bench_point(tokens, in_f, out_f, s, block=tuple(args.block), activation=args.activation,
                                            runs=args.runs, rounds=args.rounds, threads=args.threads,
                                            with_bsr=not args.no_bsr)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                print(f"T={tokens} {in_f}->{out_f} s={s:g}: best dense ({row.best_dense}) {row.dense_ms:.2f} ms, "
                      f"ours {row.ours_ms:.2f} ms ({row.speedup:.2f}x; {row.speedup_vs_mkl:.2f}x vs MKL), "
                      f"torch BSR {row.bsr_speedup or float('nan'):.2f}x, "
                      f"err {row.max_abs_err:.1e}", flush=True)
                rows.append(row)
    payload = {
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ENV_VARS if os.environ.get(k)),
                             "python scripts/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": info,
        "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_by_others_after": bench.cpu_busy_fraction(),
        "targets": {str(k): v for k, v in bench.TARGET_SPEEDUPS.items()},
        "rows": [r.to_dict() for r in rows],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(bench.format_table(rows))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
