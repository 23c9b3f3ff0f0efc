"""flash-attn 2.8.3.post2's Python package on the stub device, with its CUDA extension replaced.

Hugging Face's attn_implementation="flash_attention_2" runs the flash-attn package: transformers'
integrations/flash_attention.py and modeling_flash_attention_utils.py (transposes, dtype casts, the unpadding
paths), then flash_attn_interface.py (FlashAttnFunc: head-dim padding to a multiple of 8, the torch.library custom
ops, what ctx.save_for_backward keeps), then the compiled extension `flash_attn_2_cuda` (csrc/flash_attn/
flash_api.cpp), whose C++ allocates the outputs and scratch and launches the kernels. The package is an sdist whose
extension needs nvcc and a GPU toolchain, so this module installs the Python package without it
(`FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip install flash-attn==2.8.3.post2 --no-deps --no-build-isolation
--target .venv-flash`) and registers, under the extension's name, a module whose four entry points allocate on the
device exactly the tensors flash_api.cpp's mha_fwd, mha_bwd, mha_varlen_fwd and mha_varlen_bwd allocate (shapes,
dtypes, roundings, order; locals freed at return, in reverse order of declaration, as C++ destroys them) and run
no kernel, as every kernel on the stub device. Everything above the extension runs for real.

Written from flash_api.cpp of flash-attn v2.8.3.post2 (read, not copied). Not covered (refused): ALiBi slopes,
paged KV (block_table), leftpad_k, seqused_k, fwd_kvcache (inference only).
"""
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TARGET = os.path.join(ROOT, ".venv-flash")
VERSION = "2.8.3.post2"
DERIVED = ("derived: flash-attn's Python and transformers run for real on the stub device; the CUDA extension "
           "replaced by allocations read from flash_api.cpp")


CALLS = {"fwd": 0, "varlen_fwd": 0, "bwd": 0, "varlen_bwd": 0}  # how often each entry point ran (in the record)


def _round(x, m):
    return (x + m - 1) // m * m


def _head_size_rounded(d):
    # flash_api.cpp: round_multiple(head_size, head_size <= 128 ? 32 : 64)
    return _round(d, 32 if d <= 128 else 64)


def _num_sm():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _num_splits_heuristic(batch_nheads_mblocks, num_sms, num_n_blocks, max_splits):
    # flash_api.cpp, num_splits_heuristic (num_sms is the caller's num_sm * 2)
    if batch_nheads_mblocks >= 0.8 * num_sms:
        return 1
    max_splits = min(max_splits, num_sms, num_n_blocks)
    ceildiv = lambda a, b: (a + b - 1) // b
    eligible = lambda s: s == 1 or ceildiv(num_n_blocks, s) != ceildiv(num_n_blocks, s - 1)
    eff = []
    best = 0.0
    for s in range(1, max_splits + 1):
        if not eligible(s):
            eff.append(0.0)
            continue
        waves = float(batch_nheads_mblocks * s) / num_sms
        e = waves / float(-(-waves // 1))
        best = max(best, e)
        eff.append(e)
    for s in range(1, max_splits + 1):
        if eligible(s) and eff[s - 1] >= 0.85 * best:
            return s
    return 1


def _splitkv(batch, heads, head_size, seqlen_k, seqlen_q, head_size_rounded, p_dropout, device):
    # flash_api.cpp, set_params_splitkv: fp32 accumulators when the heuristic splits the keys (dropout: never)
    if p_dropout != 0.0:
        return None, None
    block_n = 256 if head_size <= 64 else (128 if head_size <= 128 else 64)
    n_blocks = (seqlen_k + block_n - 1) // block_n
    m_blocks = (seqlen_q + 64 - 1) // 64
    splits = _num_splits_heuristic(batch * heads * m_blocks, _num_sm() * 2, n_blocks, 128)
    if splits <= 1:
        return None, None
    lse_accum = torch.empty((splits, batch, heads, seqlen_q), dtype=torch.float32, device=device)
    out_accum = torch.empty((splits, batch, heads, seqlen_q, head_size_rounded), dtype=torch.float32, device=device)
    return lse_accum, out_accum


def _refuse(name, value):
    if value is not None:
        raise NotImplementedError(f"fake flash_attn_2_cuda: {name} is not modelled")


def fwd(q, k, v, out_, alibi_slopes, p_dropout, softmax_scale, is_causal, window_left, window_right, softcap,
        return_softmax, gen):
    CALLS["fwd"] += 1
    _refuse("alibi_slopes", alibi_slopes)
    batch, seqlen_q, heads, head_size = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    if seqlen_q == 1 and heads > heads_k and p_dropout == 0.0 and head_size % 8 == 0:
        raise NotImplementedError("fake flash_attn_2_cuda: seqlen_q == 1 (decoding) is not modelled")
    out = out_ if out_ is not None else torch.empty_like(q)
    hs_r = _head_size_rounded(head_size)
    softmax_lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if return_softmax:
        p = torch.empty((batch, heads, _round(seqlen_q, 128), _round(seqlen_k, 128)), dtype=q.dtype, device=q.device)
    else:
        p = torch.empty((0,), dtype=q.dtype, device=q.device)
    lse_accum, out_accum = _splitkv(batch, heads, head_size, seqlen_k, seqlen_q, hs_r, p_dropout, q.device)
    rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
    del out_accum, lse_accum  # locals freed at return
    return out, softmax_lse, p, rng_state


def varlen_fwd(q, k, v, out_, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
               max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_left,
               window_right, softcap, return_softmax, gen):
    CALLS["varlen_fwd"] += 1
    for name, val in (("alibi_slopes", alibi_slopes), ("block_table", block_table), ("seqused_k", seqused_k),
                      ("leftpad_k", leftpad_k)):
        _refuse(name, val)
    total_q, heads, head_size = q.shape
    batch = cu_seqlens_q.numel() - 1
    if max_seqlen_q == 1 and heads > k.shape[1] and p_dropout == 0.0 and head_size % 8 == 0:
        raise NotImplementedError("fake flash_attn_2_cuda: max_seqlen_q == 1 (decoding) is not modelled")
    out = out_ if out_ is not None else torch.empty_like(q)
    softmax_lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if return_softmax:
        p = torch.empty((batch, heads, _round(max_seqlen_q, 128), _round(max_seqlen_k, 128)), dtype=q.dtype,
                        device=q.device)
    else:
        p = torch.empty((0,), dtype=q.dtype, device=q.device)
    # split-KV only when seqlenq_ngroups_swapped (decoding): refused above
    rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
    if zero_tensors:
        out.zero_()
        softmax_lse.fill_(float("-inf"))
    return out, softmax_lse, p, rng_state


def bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, alibi_slopes, p_dropout, softmax_scale, is_causal,
        window_left, window_right, softcap, deterministic, gen, rng_state):
    CALLS["bwd"] += 1
    _refuse("alibi_slopes", alibi_slopes)
    batch, seqlen_q, heads, head_size = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    hs_r = _head_size_rounded(head_size)
    sq_r = _round(seqlen_q, 128)
    dq = dq_ if dq_ is not None else torch.empty_like(q)
    dk = dk_ if dk_ is not None else torch.empty_like(k)
    dv = dv_ if dv_ is not None else torch.empty_like(v)
    softmax_d = torch.empty((batch, heads, sq_r), dtype=torch.float32, device=q.device)
    if not deterministic:
        dq_accum = torch.empty((batch, sq_r, heads, hs_r), dtype=torch.float32, device=q.device)
    else:
        nsplits = (_num_sm() + batch * heads - 1) // (batch * heads)
        dq_accum = torch.zeros((nsplits, batch, sq_r, heads, hs_r), dtype=torch.float32, device=q.device)
    if heads_k != heads:  # MQA / GQA: per query head, summed over each group into dk, dv after the kernel
        dk_expanded = torch.empty((batch, seqlen_k, heads, head_size), dtype=q.dtype, device=q.device)
        dv_expanded = torch.empty((batch, seqlen_k, heads, head_size), dtype=q.dtype, device=q.device)
        torch.sum(dk_expanded.reshape(batch, seqlen_k, heads_k, heads // heads_k, head_size), 3, out=dk)
        torch.sum(dv_expanded.reshape(batch, seqlen_k, heads_k, heads // heads_k, head_size), 3, out=dv)
        del dv_expanded, dk_expanded
    del dq_accum
    return dq, dk, dv, softmax_d


def varlen_bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
               max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_left,
               window_right, softcap, deterministic, gen, rng_state):
    CALLS["varlen_bwd"] += 1
    _refuse("alibi_slopes", alibi_slopes)
    total_q, heads, head_size = q.shape
    total_k, heads_k = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.numel() - 1
    hs_r = _head_size_rounded(head_size)
    dq = dq_ if dq_ is not None else torch.empty_like(q)
    dk = dk_ if dk_ is not None else torch.empty_like(k)
    dv = dv_ if dv_ is not None else torch.empty_like(v)
    softmax_d = torch.empty((heads, total_q + 128 * batch), dtype=torch.float32, device=q.device)
    if not deterministic:
        dq_accum = torch.empty((total_q + 128 * batch, heads, hs_r), dtype=torch.float32, device=q.device)
    else:
        nsplits = (_num_sm() + batch * heads - 1) // (batch * heads)
        dq_accum = torch.zeros((nsplits, total_q + 128 * batch, heads, hs_r), dtype=torch.float32, device=q.device)
    if heads_k != heads:
        dk_expanded = torch.empty((total_k, heads, head_size), dtype=q.dtype, device=q.device)
        dv_expanded = torch.empty((total_k, heads, head_size), dtype=q.dtype, device=q.device)
        if zero_tensors:
            dk_expanded.zero_()
            dv_expanded.zero_()
        torch.sum(dk_expanded.reshape(total_k, heads_k, heads // heads_k, head_size), 2, out=dk)
        torch.sum(dv_expanded.reshape(total_k, heads_k, heads // heads_k, head_size), 2, out=dv)
        del dv_expanded, dk_expanded
    if zero_tensors:
        dq.zero_()
        softmax_d.zero_()
    del dq_accum
    return dq, dk, dv, softmax_d


def fwd_kvcache(*args, **kwargs):
    raise NotImplementedError("fake flash_attn_2_cuda: fwd_kvcache (inference) is not modelled")


def install():
    """Registers the fake extension and puts the installed package on sys.path; call before importing
    transformers (its availability check scans sys.path for flash-attn's distribution)."""
    if not os.path.isdir(os.path.join(TARGET, "flash_attn")):
        raise SystemExit(f"flash-attn {VERSION} is not installed in {TARGET}: run FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "
                         f"pip install flash-attn=={VERSION} --no-deps --no-build-isolation --target {TARGET}")
    if TARGET not in sys.path:
        sys.path.insert(0, TARGET)
    mod = types.ModuleType("flash_attn_2_cuda")
    mod.__doc__ = __doc__
    for f in (fwd, varlen_fwd, bwd, varlen_bwd, fwd_kvcache):
        setattr(mod, f.__name__, f)
    sys.modules["flash_attn_2_cuda"] = mod
    import flash_attn
    assert flash_attn.__version__ == VERSION, flash_attn.__version__
    return flash_attn.__version__
