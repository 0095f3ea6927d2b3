"""Probe: deterministic backward options; profile of head_groups fwd+bwd. Ran at 8b66848."""

import contextlib
import functools
import json
import os
import statistics
import time

import torch
from dilated_attn import dilated_attention
from dilated_attn.kernels import backward as B
from dilated_attn.kernels import segments as S

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe1.json", "w"), indent=1, default=str)


dev = "cuda"
SEG = [2048, 4096, 8192, 16384, 32768]
DIL = [1, 2, 4, 8, 16]


def timeit(fn, warm=2, rep=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        a = torch.cuda.Event(True)
        b = torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


n, h, d = 1 << 20, 16, 64
g = torch.Generator(device=dev).manual_seed(0)
q, k, v, do = (torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_()


def fb(mode="longnet", causal=False):
    out = dilated_attention(q, k, v, SEG, DIL, mode=mode, causal=causal, backend="triton")
    return torch.autograd.grad(out, (q, k, v), do)


def flash_backward(dout, q, k, v, out, lse, causal, scale):
    g = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, None, None, scale=scale
    )
    return g[0], g[1], g[2]


@contextlib.contextmanager
def det(warn_only, fill=True):
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    old = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = old


@contextlib.contextmanager
def fa2_engine():
    old_e = S.ENGINES["cuda"]
    old_se = B.segment_engine
    S.ENGINES["cuda"] = S.Engine(
        old_e.forward, flash_backward, old_e.dtypes, old_e.max_head_dim, old_e.min_capability
    )

    def se(*a, **kw):
        kw2 = dict(kw)
        was = torch.are_deterministic_algorithms_enabled()
        # ask as if not deterministic
        torch.use_deterministic_algorithms(False)
        try:
            return old_se(*a, **kw2)
        finally:
            torch.use_deterministic_algorithms(was)

    B.segment_engine = se
    try:
        yield
    finally:
        S.ENGINES["cuda"] = old_e
        B.segment_engine = old_se


def step(name, fn):
    t0 = time.time()
    try:
        fn()
    except Exception:
        import traceback

        log(name + "_error", traceback.format_exc()[-2000:])
    print(name, "took", round(time.time() - t0, 1), "s", flush=True)


# 1. deterministic options
def p_det():
    ref = fb()
    log("default_fwd_bwd_ms", timeit(fb))
    for wo in (True, False):
        for fill in (True, False):
            with det(wo, fill):
                log(f"det_triton_warnonly{wo}_fill{fill}_ms", timeit(fb))
    with det(False, True), fa2_engine():
        a = fb()
        b = fb()
        log("fa2_bitwise", all(torch.equal(x, y) for x, y in zip(a, b)))
        log(
            "fa2_relerr_vs_default",
            [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, ref)],
        )
        log("fa2_det_fill_ms", timeit(fb))
    with det(False, False), fa2_engine():
        log("fa2_det_nofill_ms", timeit(fb))
    with det(False, False):
        a = fb()
        b = fb()
        log("triton_bitwise", all(torch.equal(x, y) for x, y in zip(a, b)))
    # forward only under determinism
    with torch.no_grad():
        log("fwd_default_ms", timeit(lambda: dilated_attention(q, k, v, SEG, DIL, backend="triton")))


step("det", p_det)


# raw: FA2 det bwd vs cuDNN bwd on 2048 segments
def p_raw():
    segs = n // 2048
    L = [torch.randn(segs, 2048, h, d, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    qq, kk, vv, dd = (t.transpose(1, 2) for t in L)
    o, lse = S._cudnn_forward(qq, kk, vv, False, d**-0.5)
    log("raw_cudnn_bwd_ms", timeit(lambda: S._cudnn_backward(dd, qq, kk, vv, o, lse, False, d**-0.5)))
    for wo in (True, False):
        with det(wo, False):
            log(
                f"raw_fa2_bwd_det{not wo}_ms",
                timeit(lambda: flash_backward(dd, qq, kk, vv, o, lse.contiguous(), False, d**-0.5)),
            )
    log(
        "raw_fa2_bwd_nondet_ms",
        timeit(lambda: flash_backward(dd, qq, kk, vv, o, lse.contiguous(), False, d**-0.5)),
    )


step("raw", p_raw)


# 2. profiles
def prof(name, fn):
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    agg = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            key = e.name[:90]
            c, t = agg.get(key, (0, 0.0))
            agg[key] = (c + 1, t + e.device_time_total / 1000)
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:18]
    log(
        f"prof_{name}",
        {
            "total_ms": round(sum(t for _, t in agg.values()), 2),
            "top": [(k2, c, round(t, 3)) for k2, (c, t) in top],
        },
    )


def p_prof():
    for mode, causal in (("head_groups", False), ("head_groups", True), ("longnet", False)):
        step = functools.partial(fb, mode, causal)
        log(f"time_{mode}_{causal}_fb_ms", timeit(step))
        prof(f"{mode}_{causal}_fb", step)
        with torch.no_grad():
            f = functools.partial(
                dilated_attention, q, k, v, SEG, DIL, mode=mode, causal=causal, backend="triton"
            )
            log(f"time_{mode}_{causal}_f_ms", timeit(f))
            prof(f"{mode}_{causal}_f", f)


step("prof", p_prof)
