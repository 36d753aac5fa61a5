"""Where an OpenVINO engine's time goes, and the volumes/s ceiling that follows from it.

    python bench/openvino_profile.py --bundle MODEL.ubc                  # int8, batch 32
    python bench/openvino_profile.py --bundle MODEL.ubc --precision bf16 --batch 8

Compiles the bundle's artifact as the openvino backend does (its hints and threads) with
OpenVINO's per-op counters on, runs --calls batches of random slices after 2 warm-ups and
prints the time per op type and kernel (share of the summed op time), the rate of the
convolutions in GMAC/s (each one's multiply-accumulates from its weights and output
shape), the slowest of them, and what the call's rate means for ``ubc-infer``: the
pipeline keeps the engine busy, so the engine's slices/s over the scored slices of a
volume (--slices-per-volume; 120 in a BraTS-size phantom) is its ceiling in volumes/s.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from typing import Any

import numpy as np


def conv_macs(model: Any) -> dict[str, tuple[int, str]]:
    """Multiply-accumulates per slice of every convolution and its shape, by op name."""
    macs = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            weights = tuple(op.input_value(1).get_partial_shape().to_shape())
            height, width = (d.get_length() for d in op.get_output_partial_shape(0)[2:])
            shape = f"weights {'x'.join(map(str, weights))}, output {height}x{width}"
            macs[op.get_friendly_name()] = (int(np.prod(weights)) * height * width, shape)
    return macs


def profile(engine: Any, model: Any, batch: int, calls: int) -> tuple[float, list[Any]]:
    """Seconds per call and the per-op counters of every timed call of ``model`` (the
    engine's artifact) compiled with the engine's settings."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {**engine.config, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, 1, *engine.input_size))
    x = x.astype(np.float32)
    for _ in range(2):
        request.infer([x])
    counters, start = [], time.perf_counter()
    for _ in range(calls):
        request.infer([x])
        counters += list(request.profiling_info)
    return (time.perf_counter() - start) / calls, counters


def report(engine: Any, batch: int, calls: int, slices_per_volume: int) -> None:
    import openvino as ov

    model = engine.read_model(ov.Core())
    macs = conv_macs(model)
    wall, counters = profile(engine, model, batch, calls)
    by_kind: collections.Counter[tuple[str, str]] = collections.Counter()
    conv_seconds: collections.Counter[str] = collections.Counter()
    for c in counters:
        seconds = c.real_time.total_seconds() / calls
        by_kind[c.node_type, c.exec_type] += seconds
        if c.node_name in macs:
            conv_seconds[c.node_name] += seconds
    total = sum(by_kind.values())
    print(f"{engine.artifact} at {engine.precision}, batch {batch}, {engine.threads} threads: "
          f"{wall * 1e3:.1f} ms per call = {batch / wall:.1f} slices/s "
          f"(load average {os.getloadavg()[0]:.2f})")
    for (kind, kernel), seconds in by_kind.most_common(8):
        print(f"  {seconds * 1e3:7.1f} ms {100 * seconds / total:5.1f} %  {kind} ({kernel})")
    gmac = sum(m for m, _ in macs.values()) / 1e9
    conv_total = sum(conv_seconds.values())
    print(f"convolutions: {gmac:.2f} GMAC per slice, {100 * conv_total / total:.1f} % of the op "
          f"time, {gmac * batch / conv_total:.0f} GMAC/s; the whole call "
          f"{gmac * batch / wall:.0f} GMAC/s")
    print("  slowest per multiply-accumulate:")
    for name in sorted(conv_seconds, key=lambda n: macs[n][0] / conv_seconds[n])[:5]:
        rate = macs[name][0] * batch / conv_seconds[name] / 1e9
        print(f"  {conv_seconds[name] * 1e3:7.1f} ms {rate:6.0f} GMAC/s  {name} "
              f"({macs[name][1]})")
    volumes = batch / wall / slices_per_volume
    print(f"ubc-infer ceiling at {slices_per_volume} scored slices per volume: {volumes:.3f} "
          f"volumes/s; 1 volume/s needs {slices_per_volume} slices/s = "
          f"{gmac * slices_per_volume:.0f} GMAC/s, {1 / volumes:.2f}x this engine's rate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--slices-per-volume", type=int, default=120)
    args = parser.parse_args(argv)
    from ubc.engine import load

    with load(args.bundle, backend="openvino", precision=args.precision,
              threads=args.threads) as engine:
        report(engine, args.batch, args.calls, args.slices_per_volume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
