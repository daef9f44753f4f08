"""Time the metric updates at VGG-16 sizes against a VGG-16 forward pass.

    python benchmarks/bench_metrics.py                     # 512 filters, 14x14 maps, 224 px, batch 32
    python benchmarks/bench_metrics.py --out bench.json --repeats 3 --device cpu
    python benchmarks/bench_metrics.py --overlaps --threads 1 --parts 3 --repeats 5  # per-pixel vs rows

Maps are random ReLU maps (i.i.d. units: ~60% of maps have a unit above the 0.5% threshold, a
pessimistic case - trained filters concentrate their top activations on fewer images). Part masks
are random boxes. Times are per batch, median of ``--repeats`` after one warm-up.

``--overlaps``: the mode "upsample" region overlaps of one batch (Lite0: 1280 filters, 7x7 maps;
VGG-16: 512 filters, 14x14; 224 px, 3 part masks) with the former per-pixel generator (kept in
``tests/metrics/test_upsample_intervals.py``) against the row intervals, and Part
Interpretability + Network Dissection updated each with its own overlaps (as before) against one
shared pass. The variants alternate in one process (``--repeats`` rounds), so machine noise
falls on both; medians of wall and CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import pathlib
import statistics
import time

import torch

from icnn.metrics import (
    LocationInstability,
    NetworkDissection,
    PartInterpretability,
    TopQuantile,
    instability_references,
    part_iou,
)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_boxes(b, p, size, gen, device):
    yy = torch.arange(size, device=device)[None, None, :, None]
    xx = torch.arange(size, device=device)[None, None, None, :]
    y0, x0 = (torch.randint(0, size // 2, (2, b, p, 1, 1), generator=gen)).to(device)
    hh, ww = (torch.randint(size // 8, size // 2, (2, b, p, 1, 1), generator=gen)).to(device)
    return (yy >= y0) & (yy < y0 + hh) & (xx >= x0) & (xx < x0 + ww)  # (B, P, H, W)


def per_pixel_reference():
    """The former per-pixel ``_upsample_intervals``, from the test that keeps it as a reference."""
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "metrics" / "test_upsample_intervals.py"
    spec = importlib.util.spec_from_file_location("test_upsample_intervals", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference_intervals


@contextlib.contextmanager
def generator(gen):
    saved, part_iou._upsample_intervals = part_iou._upsample_intervals, gen
    try:
        yield
    finally:
        part_iou._upsample_intervals = saved


def part_pass(pi, nd, maps, masks, shared: bool) -> None:
    """PI + ND on one batch: each metric its own overlaps (before), or one pass shared."""
    ov = pi.overlaps(maps, masks) if shared else None
    pi.update(maps, masks, overlaps=ov)
    nd.update(maps, masks, overlaps=ov)


def bench_overlaps(batch, image, parts, repeats, device) -> dict:
    """Region overlaps and PI + ND updates, per-pixel vs row intervals, interleaved (module doc)."""
    old_gen, new_gen = per_pixel_reference(), part_iou._upsample_intervals
    gen = torch.Generator().manual_seed(0)
    out = {}
    for c, n, stride, offset in ((1280, 7, 32, 0.0), (512, 14, 16, 7.5)):  # Lite0 / VGG-16 conv5_3 geometry
        x = offset + stride * torch.arange(n, dtype=torch.float64) + 0.5
        centers = torch.stack(torch.broadcast_tensors(x[None, :], x[:, None]), dim=-1)
        maps = torch.relu(torch.randn(batch, c, n, n, generator=gen)).to(device)
        tq = TopQuantile(c, 10 * batch * n * n)
        for _ in range(10):
            tq.update(torch.relu(torch.randn(batch, c, n, n, generator=gen)).to(device))
        thr = tq.compute()
        masks = random_boxes(batch, parts, image, gen, device)
        pi, nd = PartInterpretability(thr, parts, centers=centers), NetworkDissection(thr, parts, centers=centers)
        tasks = {  # name: (per-pixel variant, row-interval variant)
            "region_overlaps": (functools.partial(pi.overlaps, maps, masks),) * 2,
            "PI + ND update": tuple(functools.partial(part_pass, pi, nd, maps, masks, sh) for sh in (False, True)),
        }
        with generator(old_gen):
            ref = pi.overlaps(maps, masks)
        assert all(torch.equal(u, v) for u, v in zip(ref, pi.overlaps(maps, masks))), "regions differ"
        times = {(t, v): ([], []) for t in tasks for v in (0, 1)}  # wall, cpu
        for _ in range(repeats):  # alternate the variants: noise falls on all of them
            for t, fns in tasks.items():
                for v, (g, fn) in enumerate(zip((old_gen, new_gen), fns)):
                    with generator(g):
                        if device == "cuda":
                            torch.cuda.synchronize()
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        times[t, v][0].append(time.perf_counter() - t0)
                        times[t, v][1].append(time.process_time() - c0)
        active = float((maps.amax(dim=(-2, -1)) > thr).float().mean())
        key = f"{c} filters, {n}x{n}"
        print(f"{key} maps, {image} px, batch {batch}, {parts} parts, maps above threshold {active:.2f}, "
              f"threads {torch.get_num_threads()}, median of {repeats} interleaved rounds")
        print(f"  {'':16s} {'per-pixel ms':>13s} {'rows ms':>9s} {'speed-up':>9s} {'cpu ms (pp / rows)':>20s} "
              f"{'images/s (pp / rows)':>21s}")
        out[key] = {"maps_above_threshold": active}
        for t in tasks:
            (w0, c0), (w1, c1) = ([statistics.median(x) for x in times[t, v]] for v in (0, 1))
            out[key][t] = {"per_pixel_s": w0, "rows_s": w1, "per_pixel_cpu_s": c0, "rows_cpu_s": c1}
            print(f"  {t:16s} {w0 * 1e3:13.1f} {w1 * 1e3:9.1f} {w0 / w1:8.1f}x {c0 * 1e3:9.1f} / {c1 * 1e3:8.1f} "
                  f"{batch / w0:10.1f} / {batch / w1:8.1f}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, default=512)
    ap.add_argument("--map", type=int, default=14)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--parts", type=int, default=5)
    ap.add_argument("--landmarks", type=int, default=3)
    ap.add_argument("--images", type=int, default=5794, help="dataset size for TopQuantile capacity")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--overlaps", action="store_true", help="only the region overlaps, per-pixel vs rows")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if args.overlaps:
        result = bench_overlaps(args.batch, args.image, args.parts, args.repeats, dev)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
        return result
    gen = torch.Generator().manual_seed(0)
    b, c, n, big = args.batch, args.filters, args.map, args.image
    stride = big / n
    maps = torch.relu(torch.randn(b, c, n, n, generator=gen)).to(dev)  # (B, C, n, n)
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * stride
    centers = torch.stack(torch.broadcast_tensors(x[None, :], x[:, None]), dim=-1)  # (n, n, 2)
    landmarks = (torch.rand(b, args.landmarks, 2, generator=gen, dtype=torch.float64) * big).to(dev)
    labels = torch.zeros(b, dtype=torch.long)
    masks = random_boxes(b, args.parts, big, gen, dev)

    # thresholds as a real run would find them: the 0.5% quantile of this map distribution
    tq0 = TopQuantile(c, 20 * b * n * n)
    tq0_maps = [torch.relu(torch.randn(b, c, n, n, generator=gen)).to(dev) for _ in range(20)]
    for m in tq0_maps:
        tq0.update(m)
    thr = tq0.compute()
    active = float((maps.amax(dim=(-2, -1)) > thr).float().mean())

    rows = {}

    tq = TopQuantile(c, args.images * n * n)
    for m in tq0_maps:  # 20 batches into the pass (of ~180): the kept minimum filters most values
        tq.update(m)
    rows["TopQuantile.update"] = timed(lambda: tq.update(maps), args.repeats, dev)
    li = LocationInstability(c, args.landmarks, top_k=100)
    for _ in range(4):  # fill the top-100 first: steady state
        li.update_maps(maps, centers, landmarks, labels, (big, big))
    rows["LocationInstability.update_maps"] = timed(
        lambda: li.update_maps(maps, centers, landmarks, labels, (big, big)), args.repeats, dev
    )
    pi_up = PartInterpretability(thr, args.parts, centers=centers)
    rows["PartInterpretability.update (upsample)"] = timed(lambda: pi_up.update(maps, masks), args.repeats, dev)
    pi_rf = PartInterpretability(thr, args.parts, mode="rf", centers=centers)
    rows["PartInterpretability.update (rf)"] = timed(lambda: pi_rf.update(maps, masks), args.repeats, dev)
    nd = NetworkDissection(thr, args.parts, centers=centers)
    rows["NetworkDissection.update"] = timed(lambda: nd.update(maps, masks), args.repeats, dev)
    lm_all = torch.rand(args.images, args.landmarks, 2, generator=gen, dtype=torch.float64) * big
    once = timed(
        lambda: instability_references(lm_all, None, (big, big), centers, draws=20), 1, "cpu"
    )

    vgg = None
    if not args.skip_vgg:
        from torchvision.models import vgg16

        net = vgg16(weights=None).eval().to(dev)
        img = torch.rand(b, 3, big, big, generator=gen).to(dev)
        with torch.no_grad():
            vgg = timed(lambda: net(img), args.repeats, dev)

    print(f"device={dev} threads={torch.get_num_threads()} batch={b} filters={c} map={n}x{n} "
          f"image={big} parts={args.parts} maps_above_threshold={active:.2f}")
    print(f"{'update':42s} {'ms/batch':>10s} {'x VGG-16 fwd':>13s}")
    for name, t in rows.items():
        ratio = f"{t / vgg:13.3f}" if vgg else f"{'-':>13s}"
        print(f"{name:42s} {t * 1e3:10.1f} {ratio}")
    if vgg:
        print(f"{'VGG-16 forward (torchvision, no_grad)':42s} {vgg * 1e3:10.1f} {1.0:13.3f}")
    print(f"instability_references ({args.images} images, 20 draws, once per evaluation): {once * 1e3:.1f} ms")
    result = {
        "device": dev,
        "threads": torch.get_num_threads(),
        "batch": b,
        "filters": c,
        "map": n,
        "image": big,
        "parts": args.parts,
        "maps_above_threshold": active,
        "seconds_per_batch": rows,
        "vgg16_forward_seconds": vgg,
        "instability_references_seconds": once,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
