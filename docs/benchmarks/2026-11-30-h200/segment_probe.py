"""cuDNN attention on strided views of every ``longnet-1m`` pattern, against the segment ceiling.

torch only (no library code): for each pattern ``(w, r)`` and offset class ``o`` the rows ``o::r`` of
every segment and the heads ``o::r`` are a strided view of the ``(b, n, h, d)`` tensors; cuDNN's SDPA
(with its log-sum-exp) runs on a batch of them, forward and backward (under a given merged ``out`` and
``lse``), with no merges. Prints each time over the ideal: the ceiling's time per FLOP (cuDNN on
contiguous ``(n / 2048, h, 2048, d)`` segments, with log-sum-exp) times the pattern's 1.9375x the work of
one segment pass. Also the peak memory of one whole-pattern backward call and whether cuDNN's backward
is bitwise reproducible. Needs a CUDA GPU with cuDNN attention (sm_90 measured).
"""

from __future__ import annotations

import torch

DEV, DT = "cuda", torch.bfloat16
FWD = torch.ops.aten._scaled_dot_product_cudnn_attention
BWD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
WORK = sum(1 / r for r in DILATIONS)  # 1.9375 segment passes


def ms(fn, repeats=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def view(x, w, r, o):
    b, n, h, d = x.shape
    return x.view(b * n // w, w, h, d)[:, o::r, o::r, :].transpose(1, 2)


def forward_all(q, k, v, causal, scale):
    for w, r in zip(SEGMENTS, DILATIONS):
        for o in range(r):
            FWD(
                view(q, w, r, o),
                view(k, w, r, o),
                view(v, w, r, o),
                None,
                True,
                0.0,
                causal,
                False,
                scale=scale,
            )


def backward_all(dout, q, k, v, out, lse, causal, scale, patterns=None):
    grads = []
    for w, r in patterns or zip(SEGMENTS, DILATIONS):
        for o in range(r):
            views = [view(t, w, r, o) for t in (dout, q, k, v, out)]
            b, n, h = lse.shape
            stats = lse.view(b * n // w, w, h)[:, o::r, o::r].transpose(1, 2).contiguous().unsqueeze(-1)
            rows = views[1].shape[2]
            grads.append(
                BWD(*views, stats, None, None, None, None, None, rows, rows, 0.0, causal, scale=scale)
            )
    return grads


def study(heads, head_dim, causal):
    n, scale = 1 << 20, head_dim**-0.5
    q, k, v, dout, out = (torch.randn(1, n, heads, head_dim, device=DEV, dtype=DT) for _ in range(5))
    lse = torch.randn(1, n, heads, device=DEV)
    seg = [
        torch.randn(n // 2048, 2048, heads, head_dim, device=DEV, dtype=DT).transpose(1, 2) for _ in range(4)
    ]
    o, stats = FWD(*seg[:3], None, True, 0.0, causal, False, scale=scale)[:2]
    rest = (None, None, None, None, None, 2048, 2048, 0.0, causal)
    ceiling_fwd = ms(lambda: FWD(*seg[:3], None, True, 0.0, causal, False, scale=scale))
    ceiling_bwd = ms(lambda: BWD(seg[3], *seg[:3], o, stats, *rest, scale=scale))
    ours_fwd = ms(lambda: forward_all(q, k, v, causal, scale))
    ours_bwd = ms(lambda: backward_all(dout, q, k, v, out, lse, causal, scale))
    print(
        f"d={head_dim} causal={causal}: fwd {ours_fwd:.2f} ms = {ours_fwd / (ceiling_fwd * WORK):.3f}x ideal, "
        f"bwd {ours_bwd:.2f} ms = {ours_bwd / (ceiling_bwd * WORK):.3f}x ideal"
    )
    if head_dim == 64:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        backward_all(dout, q, k, v, out, lse, causal, scale, patterns=[(2048, 1)])
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        first = backward_all(dout, q, k, v, out, lse, causal, scale, patterns=[(4096, 2)])
        again = backward_all(dout, q, k, v, out, lse, causal, scale, patterns=[(4096, 2)])
        same = all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
        print(f"  r=1 backward call: {extra:.2f} GiB beyond its inputs; bitwise reproducible: {same}")


def main():
    torch.manual_seed(0)
    for causal in (False, True):
        study(16, 64, causal)
    study(8, 128, False)


if __name__ == "__main__":
    main()
