"""Time and peak memory of L_inter (Eq. 5): chunked `inter_scene_loss` vs the naive [Q, P] reference.

Each variant runs forward + backward in its own child process (same inputs, same seed), so the
peak memory of one does not hide the other's:
- CPU: peak resident memory above the inputs (ru_maxrss minus the RSS after building inputs);
  torch's CPU allocator bypasses tracemalloc, so RSS is the honest measure.
- CUDA: torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/inter_scene.py --queries 64 --memory 1000000 --dim 256 --decoder dot

The last line is `chunked/naive: time T, peak memory P` (ratios; below 1 is better).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _child(variant: str, args: dict, queue) -> None:
    from iuq.core.decoders import DotProductDecoder, DynamicConvDecoder
    from iuq.core.inter_scene import inter_scene_loss, inter_scene_loss_naive

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    q_n, m, dim = args["queries"], args["memory"], args["dim"]
    if args["decoder"] == "dot":
        decoder, d, pix_dim = DotProductDecoder(), dim, dim
    else:  # CondInst: 169 dynamic parameters per query on 8-channel features
        decoder, d, pix_dim = DynamicConvDecoder(soi=0.25), 169, 8
    # Warm-up on a tiny problem first: lazily initialised kernels and thread pools must not count
    # as the peak of the measured step.
    tiny = (
        torch.randn(2, d, device=device, requires_grad=True),
        torch.arange(2, device=device),
        torch.randn(40, pix_dim, device=device),
        torch.arange(40, device=device),
        decoder,
        torch.rand(40, 2, device=device),
        torch.rand(2, 2, device=device),
    )
    for fn in (inter_scene_loss, inter_scene_loss_naive):
        fn(*tiny).backward()
    queries = (0.05 * torch.randn(q_n, d, device=device)).requires_grad_()
    query_ids = torch.arange(q_n, device=device) % 8
    pixels = torch.empty(m, pix_dim, device=device).normal_()
    pixel_ids = torch.randint(0, 1000, (m,), device=device)
    pixel_xy = torch.rand(m, 2, device=device)
    query_xy = torch.rand(q_n, 2, device=device)

    def step():
        if variant == "naive":
            loss = inter_scene_loss_naive(queries, query_ids, pixels, pixel_ids, decoder, pixel_xy, query_xy)
        else:
            loss = inter_scene_loss(
                queries, query_ids, pixels, pixel_ids, decoder, pixel_xy, query_xy, chunk_size=args["chunk"]
            )
        (grad,) = torch.autograd.grad(loss, queries)
        return loss.item(), grad

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    loss, grad = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put({"loss": loss, "grad_norm": grad.norm().item(), "peak": peak, "time": statistics.median(times)})


def run(variant: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(variant, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--memory", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--decoder", choices=("dot", "dynamic"), default="dot")
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = vars(p.parse_args())
    print(json.dumps(args))
    naive, chunked = run("naive", args), run("chunked", args)
    for name, r in (("naive", naive), ("chunked", chunked)):
        print(
            f"{name:8s} loss {r['loss']:.6f}  |grad| {r['grad_norm']:.6e}  time {r['time']:.3f} s  "
            f"peak {r['peak'] / 2**20:.1f} MiB"
        )
    print(
        f"chunked/naive: time {chunked['time'] / naive['time']:.3f}, peak memory {chunked['peak'] / naive['peak']:.3f}"
    )


if __name__ == "__main__":
    main()
