"""Probe: the merge's wrong results against a float64 reference, by variant. Ran at b5eac33 with the
whole-LSE fill, before the barrier."""

import json
import os

import torch
from dilated_attn.kernels import rows as R
from dilated_attn.kernels import segments as S
from dilated_attn.kernels.launches import plan_launches

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe8.json", "w"), indent=1, default=str)


n, h, d = 1 << 20, 16, 64
g = torch.Generator(device="cuda").manual_seed(1)
q, k, v, out0 = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
lse0 = torch.randn(1, n, h, device="cuda", generator=g)
plan = plan_launches(n, h, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], "longnet")
eng = S.ENGINES["cuda"]
call = next(iter(S._calls(1, n, plan.launches[1])))
qv, kv, vv = (call.view(t).transpose(1, 2) for t in (q, k, v))
part, plse = eng.forward(qv, kv, vv, False, 0.125)
ov, lv = call.view(out0).double(), call.view(lse0).double()
pv, pl = part.transpose(1, 2).double(), plse.transpose(1, 2).double()
m = torch.maximum(lv, pl)
new = m + torch.log(torch.exp(lv - m) + torch.exp(pl - m))
ref = (ov * torch.exp(lv - new)[..., None] + pv * torch.exp(pl - new)[..., None]).to(torch.bfloat16)
del ov, lv, pv, pl, m
o = torch.empty_like(out0)
l = torch.empty_like(lse0)


def wrong(mode, p, pl_):
    o.copy_(out0)
    l.copy_(lse0)
    if mode == "sync":
        torch.cuda.synchronize()
    S.merge_into(call.view(o), call.view(l), p.transpose(1, 2), pl_.transpose(1, 2))
    return int(((call.view(o).float() - ref.float()).abs() > 0.02).any(-1).sum())


pc, plc = part.clone(), plse.clone()
for rep in range(2):
    for mode, p, pl_ in (("plain", part, plse), ("sync", part, plse), ("clone", pc, plc)):
        log(f"{mode} #{rep}: wrong rows per run", [wrong(mode, p, pl_) for _ in range(16)])
# scatter: copy part into o's view vs torch copy
t_ref = torch.empty_like(out0)
t_ref.copy_(out0)
call.view(t_ref).copy_(part.transpose(1, 2))
res_s = []
for _ in range(16):
    o.copy_(out0)
    R.scatter_into([call.view(o)], [part.transpose(1, 2)], [False])
    res_s.append(int((o != t_ref).any(-1).sum()))
log("scatter copy: wrong rows per run", res_s)
res_a = []
t_ref.copy_(out0)
call.view(t_ref).add_(part.transpose(1, 2))
for _ in range(16):
    o.copy_(out0)
    R.scatter_into([call.view(o)], [part.transpose(1, 2)], [True])
    res_a.append(int((o != t_ref).any(-1).sum()))
log("scatter add: wrong rows per run", res_a)
res_t = []
for _ in range(16):
    o.copy_(out0)
    call.view(o).add_(part.transpose(1, 2))
    res_t.append(int((o != t_ref).any(-1).sum()))
log("torch add: wrong rows per run", res_t)
