//! What each op allocates, saves for backward and frees, in the order PyTorch 2.15 does it on CUDA.
//!
//! Each function here is one PyTorch op (or one autograd node) and says, in its comment, which tensors the op
//! returns, which of them autograd saves, and in which dtype. The orders were read from allocation traces of
//! `scripts/measure/measure.py` (fake-CUDA method, `VRAMFIT_TRACE=file`), see docs/ACCURACY.md.
//!
//! Notation: `n` tokens (batch x sequence), `p` bytes of a matmul output (2 under autocast or in bf16, else 4),
//! `r` bytes of the residual stream and norm outputs (fp32 under autocast: LayerNorm is on autocast's fp32 list
//! and `x + f(x)` promotes to fp32), `pb` bytes of parameters and their grads.

use crate::arch::Arch;
use crate::model::{ModelConfig, Setup};
use crate::policy::{sdpa_backend, Precision, SdpaBackend};
use crate::sim::{Category, Sim, Tensor};
use crate::Error;

use Category::{Activations, Grads, Temporary, WeightCopies, Workspace};

/// The cuBLASLt workspace `addmm` takes for a Linear with bias (`addmm_out_cuda_impl` uses cuBLASLt's
/// `gemm_and_bias` for a 1-D bias, and `allocateCUDABlasWorkspace` gives it `CUBLASLT_WORKSPACE_SIZE`, 1024 KiB by
/// default): 1,048,576 B per addmm in the stub-cuda snapshots of gpt2-124m-bias-fp16 and wide-2048-fp32 (sm_90)
/// and of a one-layer model with bias on sm_89 (fp16-amp), sm_86 (bf16-amp) and sm_80 (fp32).
pub const CUBLASLT_WORKSPACE_BYTES: u64 = 1 << 20;

/// cuBLAS workspace that PyTorch 2.15 takes from its caching allocator for each GEMM
/// (`at::cuda::getCurrentCUDABlasHandleWithWorkspace` -> `allocateCUDABlasWorkspace`, called inside the matmul
/// after its output exists) and returns when the GEMM is done: it persists only with
/// `TORCH_CUBLAS_WORKSPACE_CACHE=1`. Sizes from the stub-cuda method's memory snapshots of
/// `tiny-1layer-fp32-sgd`: 33,554,432 B (32 MiB) on sm_90, 8,519,680 B (8 MiB + 128 KiB) on sm_89, one
/// allocation per mm.
pub fn cublas_workspace_bytes(sm: u32) -> u64 {
    if sm >= 90 {
        32 << 20
    } else {
        (8 << 20) + (128 << 10)
    }
}

/// The dimensions and dtypes every op needs, with the allocator it records into.
pub struct Ctx<'a> {
    pub sim: &'a mut Sim,
    pub m: &'a ModelConfig,
    /// What the model is made of (`arch`), for the executors.
    pub arch: Arch,
    pub prec: Precision,
    pub b: u64,
    pub t: u64,
    pub n: u64,
    /// Matmul output bytes.
    pub p: u64,
    /// Residual / norm output bytes.
    pub r: u64,
    /// Parameter and grad bytes.
    pub pb: u64,
    pub backend: SdpaBackend,
    pub dropout: bool,
    pub sm: u32,
    /// Parameters have `.grad` already (a later micro-step accumulates into them).
    pub have_grads: bool,
    /// `.grad` of every parameter, freed by `zero_grad(set_to_none=True)`.
    pub grads: Vec<Tensor>,
    /// Autocast's cast cache entries held only by the cache (bias casts): freed when autocast exits.
    pub autocast_cache: Vec<Tensor>,
    /// Whether ops keep what their backward needs. Off in a checkpointed block's first forward
    /// (`torch.utils.checkpoint(use_reentrant=False)` hands every tensor an op saves to a pack hook that keeps
    /// only a handle): there each tensor dies as soon as the forward itself lets go of it.
    pub saving: bool,
    /// Whether the current layer attends through the model's sliding window (every layer, but Gemma 3's global
    /// ones: `Arch::layer_slides`).
    pub sliding_layer: bool,
    /// Rotary tables beyond the first (Gemma 3's sliding layers'), freed with it after the backward.
    pub rope_tables: Vec<Tensor>,
    /// The first block's input is the embeddings' output, which the model keeps bound through the forward.
    pub first_block: bool,
    /// FSDP2's state when the model is sharded (`distributed`): its hooks run around each block.
    pub fsdp: Option<Box<crate::distributed::Fsdp>>,
}

impl<'a> Ctx<'a> {
    pub fn new(sim: &'a mut Sim, setup: &'a Setup) -> Result<Ctx<'a>, Error> {
        let m = &setup.model;
        let prec = setup.train.precision;
        let p = prec.matmul_bytes();
        let backend = sdpa_backend(setup.device.sm, p, m.head_dim())?;
        Ok(Ctx {
            sim,
            m,
            arch: Arch::of(m, setup.train.attention),
            prec,
            b: setup.train.batch_size,
            t: setup.train.seq_len,
            n: setup.train.batch_size * setup.train.seq_len,
            p,
            r: prec.param_bytes(),
            pb: prec.param_bytes(),
            backend,
            dropout: m.dropout > 0.0,
            sm: setup.device.sm,
            have_grads: false,
            grads: Vec::new(),
            autocast_cache: Vec::new(),
            saving: true,
            sliding_layer: true,
            rope_tables: Vec::new(),
            first_block: false,
            fsdp: None,
        })
    }

    #[inline]
    pub fn alloc(&mut self, n_bytes: u64, category: Category, op: &'static str) -> Tensor {
        self.sim.alloc(n_bytes, category, op)
    }

    #[inline]
    pub fn free(&mut self, t: Tensor) {
        self.sim.free(t);
    }

    /// Leaving the outermost `torch.autocast` clears its cast cache: casts that nothing saved for backward
    /// (bias casts; weight casts of checkpointed blocks) are freed.
    pub fn clear_autocast_cache(&mut self) {
        let cache = std::mem::take(&mut self.autocast_cache);
        self.sim.free_all(&cache);
    }

    /// Frees `t` where only a saved-for-backward reference would have kept it alive (see `saving`).
    pub fn drop_unsaved(&mut self, t: Tensor) {
        if !self.saving {
            self.free(t);
        }
    }

    /// A cuBLAS GEMM runs (its output already allocated): its workspace comes and goes with it.
    pub fn matmul_workspace(&mut self) {
        let bytes = cublas_workspace_bytes(self.sm);
        self.sim.scratch(bytes, Workspace, "cublas_workspace");
    }

    /// An `addmm` with a 1-D bias runs through cuBLASLt (`gemm_and_bias`): its own, smaller workspace comes and
    /// goes with it.
    pub fn addmm_workspace(&mut self) {
        self.sim
            .scratch(CUBLASLT_WORKSPACE_BYTES, Workspace, "cublaslt_workspace");
    }
}

/// What a Linear keeps for its backward.
pub struct LinearSaved {
    /// The input as the matmul saw it, when this op made it (autocast's cast of an fp32 input).
    pub input_cast: Option<Tensor>,
    /// Autocast's low-precision copy of the weight (cached for the forward, saved for backward).
    pub weight_cast: Option<Tensor>,
    pub in_f: u64,
    pub out_f: u64,
    pub bias: bool,
}

/// `F.linear(x, W, b)` on n tokens. Under autocast (`addmm`/`mm` are on the lower-precision list) the bias, the
/// weight and an fp32 input are each cast to 2 bytes first, in that order; the weight cast is cached by autocast
/// and saved for the input gradient, the (cast) input is saved for the weight gradient, the bias cast is held
/// only by the cache. Output: n x out_f in matmul dtype.
pub fn linear_fwd(
    cx: &mut Ctx,
    input_bytes: u64,
    in_f: u64,
    out_f: u64,
    bias: bool,
    out_category: Category,
) -> (Tensor, LinearSaved) {
    let mut saved = LinearSaved {
        input_cast: None,
        weight_cast: None,
        in_f,
        out_f,
        bias,
    };
    if cx.prec.autocast() {
        if bias {
            let c = cx.alloc(out_f * 2, WeightCopies, "_to_copy");
            cx.autocast_cache.push(c);
        }
        saved.weight_cast = Some(cx.alloc(in_f * out_f * 2, WeightCopies, "_to_copy"));
        if input_bytes == 4 {
            saved.input_cast = Some(cx.alloc(cx.n * in_f * 2, Activations, "_to_copy"));
        }
    }
    let y = cx.alloc(
        cx.n * out_f * cx.p,
        out_category,
        if bias { "addmm" } else { "mm" },
    );
    if bias {
        cx.addmm_workspace();
    } else {
        cx.matmul_workspace();
    }
    // Unsaved, the cast input dies with the matmul (stub-cuda snapshot of llama-ckpt-1024: each 2-byte input
    // cast is freed right after its GEMM's workspace).
    if let Some(t) = saved.input_cast {
        cx.drop_unsaved(t);
    }
    (y, saved)
}

/// Two gradients of the same tensor summed by the autograd engine's input buffer: out of place (a new buffer),
/// then both addends are released.
pub fn grad_sum(cx: &mut Ctx, a: Tensor, b: Tensor, n_bytes: u64) -> Tensor {
    let sum = cx.alloc(n_bytes, Temporary, "add");
    cx.free(a);
    cx.free(b);
    sum
}

/// The input a Linear read, once the caller lets go of it: kept when the Linear saved it itself (no autocast),
/// freed when the Linear saved its own 2-byte cast instead (autocast), since nothing else holds it then.
pub fn keep_if_saved(cx: &mut Ctx, input: Tensor, linear: &LinearSaved) -> Option<Tensor> {
    if linear.input_cast.is_some() || !cx.saving {
        cx.free(input);
        None
    } else {
        Some(input)
    }
}

/// A parameter's gradient arriving from its op's backward (`computed`, in matmul dtype) and landing in `.grad`.
/// AccumulateGrad steals the first gradient of a step when its dtype matches the parameter; under autocast the
/// gradient of the weight cast first goes through `_to_copy` back to fp32 (ToCopyBackward). A later micro-step
/// adds into the existing `.grad` in place.
fn param_grad(cx: &mut Ctx, computed: Tensor, elems: u64) {
    let converted = if cx.prec.autocast() {
        let g = cx.alloc(
            elems * 4,
            if cx.have_grads { Temporary } else { Grads },
            "_to_copy",
        );
        cx.free(computed);
        g
    } else {
        computed
    };
    if cx.have_grads {
        cx.free(converted);
    } else {
        cx.grads.push(converted);
    }
}

fn grad_category(cx: &Ctx) -> Category {
    if cx.prec.autocast() || cx.have_grads {
        Temporary
    } else {
        Grads
    }
}

/// Backward of `linear_fwd`: `mm` for the weight gradient (out_f x in_f), `mm` for the input gradient
/// (n x in_f) and `sum` for the bias gradient, all in matmul dtype; an fp32 gradient arriving from the
/// residual stream is first cast down to the output's dtype by the autograd engine (`validate_outputs`). Then
/// the saved cast input and weight copy are released, and the casts' backward (`_to_copy`) brings the input
/// gradient back to fp32 and the weight gradient to `.grad`.
///
/// `release_grad_out` is false when the residual stream still holds the incoming gradient. `saved_input` is
/// freed after the matmuls when this op held the last reference to it.
pub fn linear_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    grad_out_bytes: u64,
    release_grad_out: bool,
    saved: LinearSaved,
    saved_input: Option<Tensor>,
) -> Tensor {
    let cast = (grad_out_bytes != cx.p)
        .then(|| cx.alloc(cx.n * saved.out_f * cx.p, Temporary, "_to_copy"));
    if cast.is_some() && release_grad_out {
        cx.free(grad_out);
    }
    // `MmBackward0` computes the weight's gradient (`mat2`) before the input's (`self`): the stub-cuda snapshots of
    // nanogpt-30m-b4 and llama-3.2-1b-tied show the out_f x in_f mm first in every block.
    let cat = grad_category(cx);
    let gw = cx.alloc(saved.out_f * saved.in_f * cx.p, cat, "mm");
    cx.matmul_workspace();
    let grad_in = cx.alloc(cx.n * saved.in_f * cx.p, Temporary, "mm");
    cx.matmul_workspace();
    let gb = saved.bias.then(|| cx.alloc(saved.out_f * cx.p, cat, "sum"));
    match cast {
        Some(c) => cx.free(c),
        None if release_grad_out => cx.free(grad_out),
        None => {}
    }
    if let Some(t) = saved_input {
        cx.free(t);
    }
    if let Some(t) = saved.input_cast {
        cx.free(t);
    }
    if let Some(t) = saved.weight_cast {
        cx.free(t);
    }
    let grad_in = if saved.input_cast.is_some() {
        let wide = cx.alloc(cx.n * saved.in_f * 4, Temporary, "_to_copy");
        cx.free(grad_in);
        wide
    } else {
        grad_in
    };
    param_grad(cx, gw, saved.out_f * saved.in_f);
    if let Some(gb) = gb {
        param_grad(cx, gb, saved.out_f);
    }
    grad_in
}

/// What a LayerNorm / RMSNorm keeps besides its input.
pub struct NormSaved {
    pub stats: [Option<Tensor>; 2],
    /// Tensors of the norm's own making that its backward needs (RMSNorm's normalised x).
    pub own: [Option<Tensor>; 2],
}

impl NormSaved {
    /// No norm (OLMo 2 has none before its branches).
    pub fn none() -> NormSaved {
        NormSaved {
            stats: [None, None],
            own: [None, None],
        }
    }
}

/// `F.layer_norm` (`native_layer_norm`): output n x C in the input's dtype (fp32 under autocast: layer_norm is
/// on autocast's fp32 list), mean and rstd fp32 [n]. Saves input, weight, bias, mean, rstd.
pub fn layer_norm_fwd(cx: &mut Ctx) -> (Tensor, NormSaved) {
    let c = cx.m.n_embd;
    let out = cx.alloc(cx.n * c * cx.r, Activations, "native_layer_norm");
    let mean = cx.alloc(cx.n * 4, Activations, "native_layer_norm");
    let rstd = cx.alloc(cx.n * 4, Activations, "native_layer_norm");
    cx.drop_unsaved(mean);
    cx.drop_unsaved(rstd);
    (
        out,
        NormSaved {
            stats: [Some(mean), Some(rstd)],
            own: [None, None],
        },
    )
}

/// `native_layer_norm_backward`: grad input n x C, grad weight and bias [C] (to `.grad`); then the incoming
/// gradient, the saved input and the statistics are released.
pub fn layer_norm_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    saved: NormSaved,
    input: Option<Tensor>,
    bias: bool,
) -> Tensor {
    let c = cx.m.n_embd;
    let gi = cx.alloc(cx.n * c * cx.r, Temporary, "native_layer_norm_backward");
    let cat = if cx.have_grads { Temporary } else { Grads };
    let gw = cx.alloc(c * cx.pb, cat, "native_layer_norm_backward");
    let gb = bias.then(|| cx.alloc(c * cx.pb, cat, "native_layer_norm_backward"));
    cx.free(grad_out);
    cx.sim.free_some(&[input]);
    cx.sim.free_some(&saved.stats);
    for g in [Some(gw), gb].into_iter().flatten() {
        if cx.have_grads {
            cx.free(g);
        } else {
            cx.grads.push(g);
        }
    }
    gi
}

/// HF `LlamaRMSNorm` in PyTorch ops on the residual stream (n rows of C, in the stream's dtype): see
/// `rms_norm_fwd_on`.
pub fn rms_norm_fwd(cx: &mut Ctx) -> (Tensor, NormSaved) {
    let (n, c, r) = (cx.n, cx.m.n_embd, cx.r);
    rms_norm_fwd_on(cx, n, c, r)
}

/// HF's RMSNorm (`LlamaRMSNorm`, Qwen3's q/k norms) in PyTorch ops on `rows` rows of `width` in `in_bytes`:
/// `x.to(fp32)` (a copy only for a 2-byte input, then saved by `pow` and the multiply), `pow(2)` (temporary),
/// `mean(-1, keepdim)` [rows], `+ eps`, `rsqrt` [rows] (saved), `x * rsqrt` rows x width fp32 (saved by the
/// weight multiply), `weight * normed.to(input dtype)`: for a 2-byte input the normalised x is cast back first
/// (the cast saved, the fp32 one freed), and the product takes the wider of the weight's and the input's dtype
/// (fp32 for a 2-byte input under autocast, whose weights are fp32). Returns the output and what it saved.
pub fn rms_norm_fwd_on(cx: &mut Ctx, rows: u64, width: u64, in_bytes: u64) -> (Tensor, NormSaved) {
    let wide = rows * width * 4;
    let pow = cx.alloc(wide, Temporary, "pow");
    let mean = cx.alloc(rows * 4, Temporary, "mean");
    cx.free(pow);
    let added = cx.alloc(rows * 4, Temporary, "add");
    let rstd = cx.alloc(rows * 4, Activations, "rsqrt");
    cx.free(added);
    let mut own = [None, None];
    if in_bytes == 2 {
        // A 2-byte input: x.to(float32) is a real copy, saved by pow and the multiply.
        own[0] = Some(cx.alloc(wide, Activations, "_to_copy"));
    }
    let normed = cx.alloc(wide, Activations, "mul");
    let out = if in_bytes == 2 {
        // normed.to(2 bytes) is saved by the weight multiply; the fp32 normed dies with the cast.
        let lp = cx.alloc(rows * width * 2, Activations, "_to_copy");
        cx.free(normed);
        let o = cx.alloc(rows * width * in_bytes.max(cx.pb), Activations, "mul");
        own[1] = Some(lp);
        o
    } else {
        own[1] = Some(normed);
        cx.alloc(wide, Activations, "mul")
    };
    // Unsaved (checkpointed forward), the normalised x and rstd die with the weight multiply.
    for t in own.into_iter().flatten().chain([rstd]) {
        cx.drop_unsaved(t);
    }
    cx.free(mean);
    (
        out,
        NormSaved {
            stats: [Some(rstd), None],
            own,
        },
    )
}

/// HF `GemmaRMSNorm` on the residual stream: `x.float()` (a copy for a 2-byte stream, saved), `pow(2)`
/// (temporary), `mean` and `+ eps` [n] (each freed as soon as read), `rsqrt` [n] (saved), `x * rsqrt` n x C fp32
/// (saved), `1 + weight.float()` [C] (saved), their product n x C fp32 and, for a 2-byte stream, `.type_as(x)`
/// (the fp32 product then dies). Order from the fake-cuda trace of a gemma bf16-amp case.
pub fn gemma_rms_norm_fwd(cx: &mut Ctx) -> (Tensor, NormSaved) {
    let r = cx.r;
    gemma_rms_norm_fwd_on(cx, r)
}

/// `gemma_rms_norm_fwd` on n x C in `r` bytes: the residual stream, or (Gemma 2's post-norms) a branch output in
/// the matmul dtype; the output takes the input's dtype.
pub fn gemma_rms_norm_fwd_on(cx: &mut Ctx, r: u64) -> (Tensor, NormSaved) {
    let (n, c) = (cx.n, cx.m.n_embd);
    gemma_rms_norm_fwd_rows(cx, n, c, r)
}

/// `GemmaRMSNorm` on `n` rows of `c` in `r` bytes (Gemma 3's q/k norms: a row per head).
pub fn gemma_rms_norm_fwd_rows(cx: &mut Ctx, n: u64, c: u64, r: u64) -> (Tensor, NormSaved) {
    fp32_rms_norm_fwd(cx, n, c, r, true)
}

/// An RMSNorm computed in fp32 and cast back to its input's dtype at the end: Gemma's (`one_plus`: the weight
/// as `1 + weight`, a [C] fp32 buffer, saved) and OLMo 2's (`(weight * normed).to(input dtype)`).
pub fn fp32_rms_norm_fwd(
    cx: &mut Ctx,
    n: u64,
    c: u64,
    r: u64,
    one_plus: bool,
) -> (Tensor, NormSaved) {
    let wide = n * c * 4;
    let copy = (r == 2).then(|| cx.alloc(wide, Activations, "_to_copy"));
    let pow = cx.alloc(wide, Temporary, "pow");
    let mean = cx.alloc(n * 4, Temporary, "mean");
    cx.free(pow);
    let added = cx.alloc(n * 4, Temporary, "add");
    cx.free(mean);
    let rstd = cx.alloc(n * 4, Activations, "rsqrt");
    cx.free(added);
    let normed = cx.alloc(wide, Activations, "mul");
    let scale = one_plus.then(|| cx.alloc(c * 4, Activations, "add"));
    let mut out = cx.alloc(wide, Activations, "mul");
    if r == 2 {
        let lp = cx.alloc(n * c * 2, Activations, "_to_copy");
        cx.free(out);
        out = lp;
    }
    for t in [copy, Some(normed), Some(rstd), scale]
        .into_iter()
        .flatten()
    {
        cx.drop_unsaved(t);
    }
    (
        out,
        NormSaved {
            stats: [Some(rstd), scale],
            own: [copy, Some(normed)],
        },
    )
}

/// Backward of `rms_norm_fwd` (the residual stream's norm): see `rms_norm_bwd_on`.
pub fn rms_norm_bwd(cx: &mut Ctx, grad_out: Tensor, saved: NormSaved, input: Tensor) -> Tensor {
    let (n, c, r) = (cx.n, cx.m.n_embd, cx.r);
    rms_norm_bwd_on(cx, grad_out, saved, Some(input), (n, c, r))
}

/// Backward of `rms_norm_fwd_on` as autograd runs it (`input`: the norm's input when it saved it itself): the weight multiply (grad of normed and of weight, a
/// `sum` to [width]), the `x * rsqrt` multiply, rsqrt's and mean's backward (rows x width fp32 temporaries), and
/// the gradients summed into one fp32 gradient of the input, cast back to a 2-byte input's dtype.
pub fn rms_norm_bwd_on(
    cx: &mut Ctx,
    grad_out: Tensor,
    saved: NormSaved,
    input: Option<Tensor>,
    (rows, width, in_bytes): (u64, u64, u64),
) -> Tensor {
    rms_norm_bwd_from(
        cx,
        grad_out,
        true,
        saved,
        input,
        (rows, width, in_bytes),
        false,
    )
}

/// `rms_norm_bwd_on` that releases the incoming gradient only when `release_grad_out` (a residual gradient
/// the skip path still holds is not).
pub fn rms_norm_bwd_keeping(
    cx: &mut Ctx,
    grad_out: Tensor,
    release_grad_out: bool,
    saved: NormSaved,
    input: Option<Tensor>,
    dims: (u64, u64, u64),
) -> Tensor {
    rms_norm_bwd_from(cx, grad_out, release_grad_out, saved, input, dims, false)
}

/// Backward of OLMo 2's norm (`fp32_rms_norm_fwd` without `one_plus`): the gradient of its cast back first
/// returns to fp32, and with 2-byte weights the weight's gradient is reduced through an fp32 buffer twice the
/// activation's size (stub-cuda snapshot of olmo2-768-tied-bf16: a 2 x N x C x 4 transient beside the two
/// products); then as `rms_norm_bwd_on`.
pub fn olmo2_rms_norm_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    release_grad_out: bool,
    saved: NormSaved,
    input: Option<Tensor>,
    (rows, width, in_bytes): (u64, u64, u64),
) -> Tensor {
    let (g, release) = if in_bytes == 2 {
        let g32 = cx.alloc(rows * width * 4, Temporary, "_to_copy");
        if release_grad_out {
            cx.free(grad_out);
        }
        (g32, true)
    } else {
        (grad_out, release_grad_out)
    };
    let bf16_weight = cx.pb == 2;
    let dims = (rows, width, in_bytes);
    rms_norm_bwd_from(cx, g, release, saved, input, dims, bf16_weight)
}

fn rms_norm_bwd_from(
    cx: &mut Ctx,
    grad_out: Tensor,
    release_grad_out: bool,
    saved: NormSaved,
    input: Option<Tensor>,
    (rows, width, in_bytes): (u64, u64, u64),
    olmo2_bf16: bool,
) -> Tensor {
    let wide = rows * width * 4;
    // weight * normed: grad of normed (mul) and of weight (mul, then sum to [width]).
    let g_normed = cx.alloc(wide, Temporary, "mul");
    let g_w_full = cx.alloc(wide, Temporary, "mul");
    if olmo2_bf16 {
        cx.sim.scratch(2 * wide, Temporary, "sum");
    }
    let cat = if cx.have_grads { Temporary } else { Grads };
    let gw = cx.alloc(width * cx.pb, cat, "sum");
    cx.free(g_w_full);
    if release_grad_out {
        cx.free(grad_out);
    }
    cx.sim.free_some(&saved.own);
    // x * rsqrt: grad of rsqrt (mul, summed to [rows]) and of x (mul).
    let g_rstd_full = cx.alloc(wide, Temporary, "mul");
    let g_x1 = cx.alloc(wide, Temporary, "mul");
    cx.free(g_rstd_full);
    cx.free(g_normed);
    cx.sim.free_some(&saved.stats);
    // rsqrt -> mean (expand / width) -> pow(2) (2 x x): three rows x width fp32 temporaries alive together.
    let g_div = cx.alloc(wide, Temporary, "div");
    let g_pow = cx.alloc(wide, Temporary, "pow");
    let g_mul = cx.alloc(wide, Temporary, "mul");
    let g_x2 = cx.alloc(wide, Temporary, "mul");
    cx.free(g_mul);
    cx.free(g_pow);
    cx.free(g_div);
    cx.sim.free_some(&[input]);
    // The two paths into x are summed by the engine's input buffer.
    // OLMo 2's with 2-byte weights: the engine adds the second path into the first in place (stub-cuda snapshot
    // of olmo2-768-tied-bf16: no new N x C buffer there; with fp32 weights the records match the new buffer).
    let gi = if olmo2_bf16 {
        cx.free(g_x2);
        g_x1
    } else {
        grad_sum(cx, g_x1, g_x2, wide)
    };
    if cx.have_grads {
        cx.free(gw);
    } else {
        cx.grads.push(gw);
    }
    if in_bytes == 2 {
        let lp = cx.alloc(rows * width * 2, Temporary, "_to_copy");
        cx.free(gi);
        return lp;
    }
    gi
}

/// `nn.Dropout(p)` in training on CUDA with 0 < p < 1: `native_dropout` returns the output (input dtype) and a
/// bool mask (1 byte per element), and saves the mask.
pub fn dropout_fwd(cx: &mut Ctx, elems: u64, bytes: u64, category: Category) -> (Tensor, Tensor) {
    let out = cx.alloc(elems * bytes, category, "native_dropout");
    let mask = cx.alloc(elems, Activations, "native_dropout");
    cx.drop_unsaved(mask);
    (out, mask)
}

/// `native_dropout_backward`: grad x mask, a new tensor; then the incoming gradient and the mask are released.
/// `release_grad_out` is false when another path (the residual stream) still holds the incoming gradient.
pub fn dropout_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    release_grad_out: bool,
    elems: u64,
    bytes: u64,
    mask: Tensor,
) -> Tensor {
    let g = cx.alloc(elems * bytes, Temporary, "native_dropout_backward");
    if release_grad_out {
        cx.free(grad_out);
    }
    cx.free(mask);
    g
}

/// What fused attention keeps: output, logsumexp and the two Philox RNG scalars (int64, one block each).
pub struct SdpaSaved {
    pub out: Tensor,
    pub lse: Tensor,
    pub rng: [Tensor; 2],
}

impl SdpaSaved {
    /// Every tensor it holds (output, logsumexp, the two RNG scalars), for releasing them together.
    pub fn tensors(&self) -> [Tensor; 4] {
        [self.out, self.lse, self.rng[0], self.rng[1]]
    }
}

/// Logsumexp of the attention kernel: fp32 [B, H, T] for flash; [B, H, round32(T)] for memory-efficient
/// (`_efficient_attention_forward` pads to its 32-row tile).
fn lse_bytes(cx: &Ctx, backend: SdpaBackend) -> u64 {
    let rows = match backend {
        SdpaBackend::Flash => cx.t,
        SdpaBackend::Efficient => cx.t.div_ceil(32) * 32,
    };
    cx.b * cx.m.n_head * rows * 4
}

/// `_scaled_dot_product_{flash,efficient}_attention`: output n x q_dim in matmul dtype (laid out as [B, T, H, hs],
/// so nanoGPT's `transpose(1, 2).contiguous()` afterwards copies nothing), logsumexp, RNG seed and offset.
/// Saves q, k, v, output, logsumexp and the RNG state. Nothing T x T exists.
pub fn sdpa_fwd(cx: &mut Ctx) -> SdpaSaved {
    let backend = cx.backend;
    sdpa_fwd_with(cx, backend)
}

/// `sdpa_fwd` on a given kernel (an explicit mask rules flash out: memory-efficient).
pub fn sdpa_fwd_with(cx: &mut Ctx, backend: SdpaBackend) -> SdpaSaved {
    let op = match backend {
        SdpaBackend::Flash => "_scaled_dot_product_flash_attention",
        SdpaBackend::Efficient => "_scaled_dot_product_efficient_attention",
    };
    let out = cx.alloc(cx.n * cx.m.q_dim() * cx.p, Activations, op);
    let lse = cx.alloc(lse_bytes(cx, backend), Activations, op);
    let rng = [cx.alloc(8, Activations, op), cx.alloc(8, Activations, op)];
    for t in [lse, rng[0], rng[1]] {
        cx.drop_unsaved(t);
    }
    SdpaSaved { out, lse, rng }
}

/// Attention backward. Kernel scratch first (FlashAttention-2 `mha_bwd`: `dq_accum` fp32
/// [B, round128(T), H, round32(hs)] and `softmax_d` fp32 [B, H, round128(T)]; memory-efficient: `delta` fp32
/// [B, H, T], plus an fp32 grad-q accumulator [B, T, H, hs] for 2-byte inputs), then dq (n x C) and dk, dv
/// (n x kv_dim) in matmul dtype. Returns (dq, dk, dv).
pub fn sdpa_bwd(cx: &mut Ctx) -> (Tensor, Tensor, Tensor) {
    let (backend, kv) = (cx.backend, cx.m.kv_dim());
    sdpa_bwd_with(cx, backend, kv)
}

/// `sdpa_bwd` on a given kernel, with k and v `kv_width` wide (all heads when the model repeated them).
pub fn sdpa_bwd_with(cx: &mut Ctx, backend: SdpaBackend, kv: u64) -> (Tensor, Tensor, Tensor) {
    let (b, t, h, hs) = (cx.b, cx.t, cx.m.n_head, cx.m.head_dim());
    let scratch = match backend {
        SdpaBackend::Flash => {
            let t128 = t.div_ceil(128) * 128;
            b * t128 * h * hs.div_ceil(32) * 32 * 4 + b * h * t128 * 4
        }
        SdpaBackend::Efficient => b * h * t * 4 + if cx.p == 4 { 0 } else { b * t * h * hs * 4 },
    };
    cx.sim
        .scratch(scratch, Workspace, "attention_backward_scratch");
    let op = match backend {
        SdpaBackend::Flash => "_scaled_dot_product_flash_attention_backward",
        SdpaBackend::Efficient => "_scaled_dot_product_efficient_attention_backward",
    };
    let dq = cx.alloc(cx.n * cx.m.q_dim() * cx.p, Temporary, op);
    let dk = cx.alloc(cx.n * kv * cx.p, Temporary, op);
    let dv = cx.alloc(cx.n * kv * cx.p, Temporary, op);
    (dq, dk, dv)
}

/// `F.embedding` backward on CUDA (`embedding_dense_backward`): sorts the indices first (two int64 buffers of
/// n, kernel scratch), then allocates the dense gradient rows x C.
pub fn embedding_bwd(cx: &mut Ctx, n_indices: u64, rows: u64) -> Tensor {
    cx.sim
        .scratch(2 * n_indices * 8, Workspace, "embedding_backward_sort");
    let cat = if cx.have_grads { Temporary } else { Grads };
    cx.alloc(rows * cx.m.n_embd * cx.pb, cat, "embedding_dense_backward")
}

/// Attention kind and dims for callers that need them.
pub fn manual_scores_elems(cx: &Ctx) -> u64 {
    cx.b * cx.m.n_head * cx.t * cx.t
}
