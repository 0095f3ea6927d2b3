"""Softmax attention on dense blocks ``(B, H, m, d)`` that also returns the log-sum-exp.

These are the per-pattern primitives under the dilated path. The backward takes ``out`` and ``lse``
from the caller rather than from its own forward: a caller that merged several partial results passes
the merged ones, and each block's gradients come out exact (the ring-attention rule).

Fused kernels do the work where PyTorch has them (flash or cuDNN on CUDA, the flash kernel on CPU);
a chunked math path that never holds more than a slice of the score matrix covers the rest (dropout,
additive biases, gradients flowing into ``lse``, shapes no fused kernel takes, non-finite inputs).
:func:`choose_kernel` is the whole routing rule.

Non-finite inputs (NaN or inf) follow the arithmetic of the math path, never a fused kernel (PyTorch's
CPU flash kernel turns a NaN query row into zeros, and every fused kernel multiplies masked-out
probabilities, exactly 0, by the values, which spreads a NaN value to rows that never see its key).
In the forward, a NaN in ``q`` row ``p`` or ``k`` row ``j`` makes ``out`` and ``lse`` NaN in the rows
that attend through it, a NaN in ``v[j, e]`` makes ``out[p, e]`` NaN for the rows ``p`` that attend
to key ``j`` (an inf follows the softmax's arithmetic), and every other row is exact. In the backward a non-finite value may spread to every
gradient row of the blocks that hold a row it reached (the 0 * NaN of the score matmuls, as in
``scaled_dot_product_attention``'s math backward); other blocks' gradients stay exact.
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


KERNELS = ("cudnn", "flash", "cpu_flash", "math")
# The fused CUDA kernels put batch and heads on grid axes y and z, which hold at most 65535 blocks.
CUDA_GRID_LIMIT = 65535
# cuDNN's fused attention: head dims that are multiples of 8 up to this (PyTorch's sdp_utils rule).
CUDNN_MAX_HEAD_DIM = 128


def choose_kernel(
    m_q: int,
    m_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device_type: str,
    *,
    heads: int = 1,
    plain: bool = True,
    finite: bool = True,
    prefer: str = "auto",
    cudnn: bool = True,
) -> str:
    """The kernel (one of :data:`KERNELS`) that runs a block of ``m_q`` queries over ``m_k`` keys.

    ``plain``: no bias, no dropout and no gradient into ``lse`` (the fused kernels take none of them);
    ``finite``: the inputs hold no NaN or inf; ``prefer``: the ``DILATED_ATTN_CUDA_KERNEL`` choice;
    ``cudnn``: cuDNN 9 or later is available. The rule, forward and backward alike:

    - ``math`` for anything not plain or not finite, and for what no fused kernel takes;
    - on CPU, PyTorch's flash kernel for float32, float64 and bfloat16 (``cpu_flash``);
    - on CUDA, fp16/bf16 with ``head_dim`` a multiple of 8 up to 256 and at most 65535 heads: cuDNN
      (``auto`` or ``cudnn``) when it takes the shape, else flash. cuDNN takes ``head_dim`` up to 128
      and at least two queries and two keys: its frontend refuses ``s_q = s_kv = 1`` and PyTorch's
      dispatcher refuses ``s_kv = 1``. The batch axis is split into launches of at most 65535.
    """
    if prefer not in ("auto", "flash", "cudnn", "math"):
        raise ValueError(f"{CUDA_KERNEL_ENV}={prefer!r} must be one of 'auto', 'flash', 'cudnn', 'math'")
    if not plain or not finite or m_q == 0 or m_k == 0:
        return "math"
    if device_type == "cpu":
        return "cpu_flash" if dtype in (torch.float32, torch.float64, torch.bfloat16) else "math"
    if device_type != "cuda" or prefer == "math":
        return "math"
    if dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return "math"
    if heads > CUDA_GRID_LIMIT:
        return "math"
    cudnn_takes = cudnn and head_dim <= CUDNN_MAX_HEAD_DIM and m_q > 1 and m_k > 1
    if prefer in ("auto", "cudnn") and cudnn_takes:
        return "cudnn"
    return "flash"


def _route(
    q: torch.Tensor, k: torch.Tensor, plain: bool, finite: bool | None, tensors: tuple[torch.Tensor, ...]
) -> str:
    """:func:`choose_kernel` for these tensors; checks finiteness only when a fused kernel would run."""
    prefer = os.environ.get(CUDA_KERNEL_ENV, "auto") if q.is_cuda else "auto"
    cudnn = (
        q.is_cuda and torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
    )
    args = (q.shape[2], k.shape[2], q.shape[-1], q.dtype, q.device.type)
    kernel = choose_kernel(*args, heads=q.shape[1], plain=plain, prefer=prefer, cudnn=cudnn)
    if kernel != "math" and finite is None:
        finite = all_finite(*tensors)
    return kernel if finite is not False else "math"


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element is finite: one float32 sum per tensor (an overflowing sum of finite
    values answers False, which only sends the call to the exact math path)."""
    total = sum(t.sum(dtype=torch.float32) for t in tensors if t.numel())
    return bool(torch.isfinite(torch.as_tensor(total)))


# The fused CUDA backward ops take bookkeeping tensors that their forward returns (undefined for
# dense batches, which Python cannot build); the first forward on each device provides them.
_CUDA_AUX: dict[tuple[str, torch.device], tuple[object, ...]] = {}


def _cuda_aux(kernel: str, q: torch.Tensor) -> tuple[object, ...]:
    key = (kernel, q.device)
    if key not in _CUDA_AUX:
        tiny = torch.zeros(1, 1, 8, q.shape[-1], device=q.device, dtype=q.dtype)
        _cuda_forward(kernel, tiny, tiny, tiny, False, 1.0)
    return _CUDA_AUX[key]


def _batch_chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The tensors split along the batch axis into launches the CUDA grid can hold."""
    B = tensors[0].shape[0]
    return [tuple(t[i : i + CUDA_GRID_LIMIT] for t in tensors) for i in range(0, B, CUDA_GRID_LIMIT)]


def _cuda_forward(
    kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        _CUDA_AUX.setdefault((kernel, q.device), (res[2], res[3], res[6], res[7]))
        return res[0], res[1]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    _CUDA_AUX.setdefault((kernel, q.device), (res[2], res[3], res[6], res[7], res[1].dim()))
    return res[0], res[1].reshape(q.shape[:-1])


def _cuda_backward(
    kernel: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse32: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m_q, m_k = q.shape[2], k.shape[2]
    if kernel == "flash":
        cum_q, cum_k, seed, offset = _cuda_aux(kernel, q)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse32, cum_q, cum_k, m_q, m_k, 0.0, causal, seed, offset, scale=scale
        )
    cum_q, cum_k, seed, offset, lse_dim = _cuda_aux(kernel, q)
    if lse_dim == 4:
        lse32 = lse32.unsqueeze(-1)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse32, seed, offset, None, cum_q, cum_k, m_q, m_k, 0.0, causal, scale=scale
    )


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
    finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v``, all ``(B, H, m, d)``; causal is top-left aligned.

    ``bias`` is additive, broadcastable to ``(B, H, m_q, m_k)``, ``-inf`` for forbidden keys.
    ``finite``: whether ``q, k, v`` are known to hold no NaN or inf (``None``: checked here when a
    fused kernel would run). Returns ``out`` ``(B, H, m, d)`` (input dtype on fused paths,
    float32/64 on the math path) and ``lse`` ``(B, H, m)`` in the compute dtype; rows without keys
    give 0 and ``-inf``.
    """
    kernel = _route(q, k, bias is None and dropout_p == 0.0, finite, (q, k, v))
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse
    if kernel in ("flash", "cudnn"):
        parts = [_cuda_forward(kernel, qc, kc, vc, causal, scale) for qc, kc, vc in _batch_chunks(q, k, v)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    return _math_forward(q, k, v, causal, scale, bias, dropout_p, generator, finite is not True)


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
    finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` given the (possibly merged) ``out`` and ``lse`` of these rows.

    ``dlse`` is the gradient reaching ``lse`` (``None`` for none). ``generator`` must be in the state
    it had before the matching forward when ``dropout_p > 0``. ``finite``: whether ``dout, q, k, v``
    are known to hold no NaN or inf (``None``: checked here when a fused kernel would run).
    """
    plain = dlse is None and bias is None and dropout_p == 0.0
    kernel = _route(q, k, plain, finite, (dout, q, k, v))
    if kernel == "cpu_flash":
        lse_c = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse_c.contiguous(), 0.0, causal, scale=scale
        )
    if kernel in ("flash", "cudnn"):
        chunks = _batch_chunks(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse.to(torch.float32).contiguous())
        parts = [
            _cuda_backward(kernel, do, qc, kc, vc, oc, lc, causal, scale) for do, qc, kc, vc, oc, lc in chunks
        ]
        if len(parts) == 1:
            return parts[0]
        dq, dk, dv = (torch.cat(grads) for grads in zip(*parts))
        return dq, dk, dv
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of rows ``start:`` and the mask of forbidden keys (``None``: none), which hold ``-inf``
    whatever ``q`` and ``k`` hold: a NaN score of a forbidden key must not reach its row."""
    s = (qc @ kt) * scale
    blocked = None
    if bias is not None:
        s = s + bias
        blocked = torch.isneginf(bias)
    if causal:
        rows = torch.arange(start, start + qc.shape[-2], device=qc.device)
        cols = torch.arange(kt.shape[-1], device=qc.device)
        future = cols[None, :] > rows[:, None]
        blocked = future if blocked is None else blocked | future
    if blocked is not None:
        s = s.masked_fill(blocked, _NEG_INF)
    return s, blocked


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
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ct = compute_dtype(q.dtype)
    B, H, m_q, _ = q.shape
    out = torch.empty(B, H, m_q, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.empty(B, H, m_q, dtype=ct, device=q.device)
    kt = k.to(ct).transpose(-1, -2)
    vc = v.to(ct)
    # A non-finite value must reach only the rows that attend to its key, but a forbidden key's
    # probability is exactly 0 and 0 * NaN is NaN: the other rows multiply zeros in its place.
    bad_v = ~torch.isfinite(vc) if check_values else None
    raw_v = vc
    if bad_v is not None and bool(bad_v.any()):
        vc = vc.masked_fill(bad_v, 0.0)
    else:
        bad_v = None
    step = _chunk_rows(q, k)
    for start in range(0, m_q, step):
        stop = min(start + step, m_q)
        s, blocked = _scores(
            q[:, :, start:stop].to(ct), kt, start, causal, scale, _bias_rows(bias, start, stop)
        )
        row_lse = torch.logsumexp(s, dim=-1)
        # Only a row without keys takes 0 and -inf; one whose scores are all -inf (an infinite
        # query) gets exp(-inf + inf) = NaN, as the softmax does.
        empty = torch.zeros_like(row_lse, dtype=torch.bool) if blocked is None else blocked.all(-1)
        p = torch.exp(s - torch.where(empty, 0.0, row_lse).unsqueeze(-1))
        if dropout_p > 0.0:
            p = p * _keep_mask(p.shape, dropout_p, generator, q.device, ct)
        rows = p @ vc
        if bad_v is not None:
            allowed = torch.ones_like(s) if blocked is None else (~blocked).to(ct).expand_as(s)
            rows = torch.where((allowed @ bad_v.to(ct)) > 0, p @ raw_v, rows)
        out[:, :, start:stop] = rows
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
        s, _ = _scores(qc, kt, start, causal, scale, _bias_rows(bias, start, stop))
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
