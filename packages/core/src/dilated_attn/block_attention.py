"""Softmax attention on dense blocks ``(B, H, m, d)`` that also returns the log-sum-exp.

These are the per-pattern primitives under the dilated path. The backward takes ``out`` and ``lse``
from the caller rather than from its own forward: a caller that merged several partial results passes
the merged ones, and each block's gradients come out exact (the ring-attention rule).

Fused kernels do the work where PyTorch has them (flash or cuDNN on CUDA, the flash kernel on CPU);
a chunked math path that never holds more than a slice of the score matrix covers the rest (dropout,
additive biases, gradients flowing into ``lse``).
"""

from __future__ import annotations

import os

import torch

_NEG_INF = float("-inf")
# Elements of one score chunk in the math path (64 MiB of float32).
_CHUNK_ELEMENTS = 1 << 24
CUDA_KERNEL_ENV = "DILATED_ATTN_CUDA_KERNEL"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cuda_kernel(head_dim: int) -> str:
    choice = os.environ.get(CUDA_KERNEL_ENV, "auto")
    if choice not in ("auto", "flash", "cudnn", "math"):
        raise ValueError(f"{CUDA_KERNEL_ENV}={choice!r} must be one of 'auto', 'flash', 'cudnn', 'math'")
    if choice == "auto":
        # cuDNN's fused attention is the faster of the two on Hopper for the head sizes it covers.
        return "cudnn" if head_dim <= 128 and torch.backends.cudnn.is_available() else "flash"
    return choice


# The fused CUDA backward ops take bookkeeping tensors that their forward returns (undefined for
# dense batches, which Python cannot build); the first forward on each device provides them.
_CUDA_AUX: dict[tuple[str, torch.device], tuple[object, ...]] = {}


def _cuda_aux(kernel: str, q: torch.Tensor) -> tuple[object, ...]:
    key = (kernel, q.device)
    if key not in _CUDA_AUX:
        tiny = torch.zeros(1, 1, 8, q.shape[-1], device=q.device, dtype=q.dtype)
        attention_forward(tiny, tiny, tiny, causal=False, scale=1.0)
    return _CUDA_AUX[key]


def _fused_ok(q: torch.Tensor, bias: torch.Tensor | None, dropout_p: float) -> bool:
    if bias is not None or dropout_p > 0.0:
        return False
    d = q.shape[-1]
    if q.is_cuda:
        return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v``, all ``(B, H, m, d)``; causal is top-left aligned.

    ``bias`` is additive, broadcastable to ``(B, H, m_q, m_k)``, ``-inf`` for forbidden keys.
    Returns ``out`` ``(B, H, m, d)`` (input dtype on fused paths, float32/64 on the math path) and
    ``lse`` ``(B, H, m)`` in the compute dtype; rows without keys give 0 and ``-inf``.
    """
    if _fused_ok(q, bias, dropout_p):
        if q.is_cuda:
            kernel = _cuda_kernel(q.shape[-1])
            if kernel == "flash":
                res = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, causal, False, scale=scale
                )
                _CUDA_AUX.setdefault((kernel, q.device), (res[2], res[3], res[6], res[7]))
                return res[0], res[1]
            if kernel == "cudnn":
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, causal, False, scale=scale
                )
                _CUDA_AUX.setdefault((kernel, q.device), (res[2], res[3], res[6], res[7], res[1].dim()))
                return res[0], res[1].reshape(q.shape[:-1])
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale
            )
            return out, lse
    return _math_forward(q, k, v, causal, scale, bias, dropout_p, generator)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    bias: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` given the (possibly merged) ``out`` and ``lse`` of these rows.

    ``dlse`` is the gradient reaching ``lse`` (``None`` for none). ``generator`` must be in the state
    it had before the matching forward when ``dropout_p > 0``.
    """
    if dlse is None and _fused_ok(q, bias, dropout_p):
        dout = dout.to(q.dtype)
        out = out.to(q.dtype)
        if q.is_cuda:
            kernel = _cuda_kernel(q.shape[-1])
            m_q, m_k = q.shape[2], k.shape[2]
            lse32 = lse.to(torch.float32).contiguous()
            if kernel == "flash":
                cum_q, cum_k, seed, offset = _cuda_aux(kernel, q)
                return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                    dout,
                    q,
                    k,
                    v,
                    out,
                    lse32,
                    cum_q,
                    cum_k,
                    m_q,
                    m_k,
                    0.0,
                    causal,
                    seed,
                    offset,
                    scale=scale,
                )
            if kernel == "cudnn":
                cum_q, cum_k, seed, offset, lse_dim = _cuda_aux(kernel, q)
                if lse_dim == 4:
                    lse32 = lse32.unsqueeze(-1)
                return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    dout,
                    q,
                    k,
                    v,
                    out,
                    lse32,
                    seed,
                    offset,
                    None,
                    cum_q,
                    cum_k,
                    m_q,
                    m_k,
                    0.0,
                    causal,
                    scale=scale,
                )
        else:
            lse_c = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse_c.contiguous(), 0.0, causal, scale=scale
            )
    return _math_backward(dout, q, k, v, out, lse, causal, scale, bias, dlse, dropout_p, generator)


def _chunk_rows(q: torch.Tensor, k: torch.Tensor) -> int:
    B, H, m_q, _ = q.shape
    per_row = max(1, B * H * k.shape[2])
    return max(1, min(m_q, _CHUNK_ELEMENTS // per_row))


def _bias_rows(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start:stop, :]


def _scores(
    qc: torch.Tensor, kt: torch.Tensor, start: int, causal: bool, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    s = (qc @ kt) * scale
    if bias is not None:
        s = s + bias
    if causal:
        rows = torch.arange(start, start + qc.shape[-2], device=qc.device)
        cols = torch.arange(kt.shape[-1], device=qc.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], _NEG_INF)
    return s


def _keep_mask(
    shape: torch.Size,
    dropout_p: float,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    keep = torch.rand(shape, generator=generator, device=device) >= dropout_p
    return keep.to(dtype) / (1.0 - dropout_p)


def _math_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    bias: torch.Tensor | None,
    dropout_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    ct = compute_dtype(q.dtype)
    B, H, m_q, _ = q.shape
    out = torch.empty(B, H, m_q, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.empty(B, H, m_q, dtype=ct, device=q.device)
    kt = k.to(ct).transpose(-1, -2)
    vc = v.to(ct)
    step = _chunk_rows(q, k)
    for start in range(0, m_q, step):
        stop = min(start + step, m_q)
        s = _scores(q[:, :, start:stop].to(ct), kt, start, causal, scale, _bias_rows(bias, start, stop))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(row_lse), 0.0, row_lse).unsqueeze(-1))
        if dropout_p > 0.0:
            p = p * _keep_mask(p.shape, dropout_p, generator, q.device, ct)
        out[:, :, start:stop] = p @ vc
        lse[:, :, start:stop] = row_lse
    return out, lse


def _math_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    bias: torch.Tensor | None,
    dlse: torch.Tensor | None,
    dropout_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ct = compute_dtype(q.dtype)
    do = dout.to(ct)
    delta = (do * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    # A row with lse = -inf has no keys: +inf makes every probability exp(s - inf) = 0.
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse.to(ct))
    kc, vc = k.to(ct), v.to(ct)
    kt = kc.transpose(-1, -2)
    dq = torch.empty(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    step = _chunk_rows(q, k)
    for start in range(0, q.shape[2], step):
        stop = min(start + step, q.shape[2])
        qc = q[:, :, start:stop].to(ct)
        s = _scores(qc, kt, start, causal, scale, _bias_rows(bias, start, stop))
        p = torch.exp(s - lse_safe[:, :, start:stop].unsqueeze(-1))
        doc = do[:, :, start:stop]
        dp = doc @ vc.transpose(-1, -2)
        if dropout_p > 0.0:
            keep = _keep_mask(p.shape, dropout_p, generator, q.device, ct)
            dv += (p * keep).transpose(-1, -2) @ doc
            dp = dp * keep
        else:
            dv += p.transpose(-1, -2) @ doc
        ds = p * (dp - delta[:, :, start:stop].unsqueeze(-1)) * scale
        dq[:, :, start:stop] = ds @ kc
        dk += ds.transpose(-1, -2) @ qc
    return dq, dk, dv
