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
use crate::finetune::{self, LoraConfig, Quantization, Role};
use crate::model::{ModelConfig, Setup};
use crate::policy::{sdpa_backend, Precision, SdpaBackend};
use crate::sim::{Category, Sim, Tensor};
use crate::Error;

use Category::{Activations, Grads, Temporary, WeightCopies, Workspace};

/// The cuBLASLt workspace an `addmm` takes when ATen sends it through cuBLASLt (`addmm_out_cuda_impl`'s Lt path,
/// `allocateCUDABlasWorkspace` of `CUBLASLT_WORKSPACE_SIZE`, 1024 KiB by default on every architecture): taken from
/// the caching allocator inside the call and returned after it, as the cuBLAS workspace. Which addmm: a bias (1-D,
/// as a Linear with bias, beta 1) in any float dtype, and a 2-D matrix (Inductor's fused `mm + add`) in fp16 or bf16
/// only; in place or with a non-contiguous matrix, and a 2-D matrix in fp32, take cuBLAS's. PyTorch's own allocator
/// on the stub device (torch 2.15; sm_80, sm_89 and sm_90 alike), 126 calls:
/// `tests/data/stub-cuda/blas_workspace.json` (`scripts/measure/probe_blas_workspace.py`); also the 1,048,576 B per
/// addmm of the stub-cuda snapshots of gpt2-124m-bias-fp16 and wide-2048-fp32 (sm_90).
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
    /// Tokens a matmul sees: batch x sequence.
    pub n: u64,
    /// Rows of the residual stream (embeddings, norms, residual adds): `n`, or `n / tp` under sequence
    /// parallel, whose stream is sharded on the sequence (`distributed`'s tensor-parallel hooks move between the
    /// two).
    pub ns: u64,
    /// Tensor-parallel degree (1: none) and whether sequence parallel is on; the model (`m`) is then one GPU's
    /// share of it (`Parallel::tp_local`).
    pub tp: u64,
    pub sp: bool,
    /// Matmul output bytes.
    pub p: u64,
    /// Residual / norm output bytes.
    pub r: u64,
    /// Parameter and grad bytes.
    pub pb: u64,
    pub backend: SdpaBackend,
    pub dropout: bool,
    pub sm: u32,
    /// The device's SM count (`DeviceConfig::sms`), for flash attention's split-KV choice.
    pub sms: u32,
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
    /// A checkpointed block's recompute in the backward (`use_reentrant=False`, early stop on, PyTorch's
    /// default): it stops as soon as it has packed again as many saved tensors as the first forward did
    /// (`_StopRecomputationError` from the pack hook), so what follows the block's last saving op never runs
    /// (stub-cuda snapshot of llama-sdpa-2048-gqa-v2k-ckpt-bf16: each recompute ends with SwiGLU's product, the
    /// down projection's matmul never recomputed).
    pub recompute_stop: bool,
    /// Whether the current layer attends through the model's sliding window (every layer, but Gemma 3's global
    /// ones: `Arch::layer_slides`).
    pub sliding_layer: bool,
    /// Rotary tables beyond the first (Gemma 3's sliding layers'), freed with it after the backward.
    pub rope_tables: Vec<Tensor>,
    /// The first block's input is the embeddings' output, which the model keeps bound through the forward.
    pub first_block: bool,
    /// Mixtures of experts with the router's auxiliary loss: each MoE layer's router logits, kept from its forward
    /// to the end of the loss (the model returns them), in layer order.
    pub router_logits: Vec<Tensor>,
    /// The auxiliary loss's gradients of those logits, from the loss's backward to each layer's router backward.
    pub aux_grads: Vec<Tensor>,
    /// LoRA (`train.lora`): the base's parameters are frozen and the adapted Linears carry adapters.
    pub lora: Option<&'a LoraConfig>,
    /// Bytes per element of LoRA's adapters (fp32, or bf16 under pure bf16).
    pub ab: u64,
    /// FSDP2's state when the model is sharded (`distributed`): its hooks run around each block.
    pub fsdp: Option<Box<crate::distributed::Fsdp>>,
    /// QLoRA: the base's Linears are bitsandbytes' `Linear4bit` or `Linear8bitLt` (`train.quantization`).
    pub quant: Option<finetune::Quantization>,
    /// Whether the current block's input needs a gradient. Not in the first block of a LoRA model whose frozen
    /// embedding's output nothing made require one: peft calls `enable_input_require_grads` only for
    /// checkpointing (transformers' `gradient_checkpointing_enable` does it too), so without checkpointing the
    /// graph starts at the first adapter (`role_input_grad`).
    pub block_input_grad: bool,
    /// Tensors held by autograd nodes outside their saved tensors (`Sim::hold`: a `Linear8bitLt`'s input), to
    /// let go when the graph they belong to is freed: the micro-step's after its backward, a checkpointed block's
    /// recompute when the recompute ends.
    pub graph_holds: Vec<Tensor>,
    /// A checkpointed MoE block's first backward steps, run before its recompute (`moe::moe_bwd_head`).
    pub moe_grad_head: Option<crate::moe::MoeGradHead>,
    /// Whether the model's outputs pass through DDP's `_DDPSink` in this forward, which clones each of them
    /// (`static_graph=True`, until its first backward: `DistributedDataParallel._post_forward`).
    pub ddp_sink_clone: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(sim: &'a mut Sim, setup: &'a Setup) -> Result<Ctx<'a>, Error> {
        let m = &setup.model;
        let par = &setup.train.parallel;
        let prec = setup.train.precision;
        let p = prec.matmul_bytes();
        let backend = sdpa_backend(setup.device.sm, p, m.head_dim())?;
        // The base's dtype: the precision's own, or `train.base_dtype` under LoRA; the embeddings, the norms and
        // so the residual stream take it (a bf16 base under bf16 autocast runs a bf16 stream).
        let wb = finetune::base_bytes(setup);
        Ok(Ctx {
            sim,
            m,
            arch: Arch::of(m, setup.train.attention),
            prec,
            b: setup.train.batch_size,
            t: setup.train.seq_len,
            n: setup.train.batch_size * setup.train.seq_len,
            ns: if par.sequence_parallel {
                setup.train.batch_size * setup.train.seq_len / par.tp
            } else {
                setup.train.batch_size * setup.train.seq_len
            },
            tp: par.tp.max(1),
            sp: par.sequence_parallel,
            p,
            r: wb,
            pb: wb,
            backend,
            dropout: m.dropout > 0.0,
            sm: setup.device.sm,
            sms: setup.device.sms,
            have_grads: false,
            grads: Vec::new(),
            autocast_cache: Vec::new(),
            saving: true,
            recompute_stop: false,
            sliding_layer: true,
            rope_tables: Vec::new(),
            first_block: false,
            router_logits: Vec::new(),
            aux_grads: Vec::new(),
            lora: setup.train.lora.as_ref(),
            ab: finetune::adapter_bytes(prec),
            fsdp: None,
            quant: setup.train.quantization,
            block_input_grad: true,
            graph_holds: Vec::new(),
            ddp_sink_clone: false,
            moe_grad_head: None,
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

    /// Whether the base model's parameters are frozen (LoRA): norms, embeddings and base Linears get no gradient.
    pub fn base_frozen(&self) -> bool {
        self.lora.is_some()
    }

    /// Whether the input of the current block's projection `role` needs a gradient: always past the first block or
    /// with `block_input_grad`; else (the first block of a LoRA model without input gradients) only once an adapter
    /// upstream in the block made one: o_proj's after an adapted q, k or v (or packed qkv), the MLP's inputs after
    /// any adapted attention projection, down_proj's also after an adapted gate or up (or packed gate_up). With
    /// norms after the branches (OLMo 2) the same holds: their weights are frozen, so the stream after the attention
    /// needs a gradient only through an adapter.
    pub fn role_input_grad(&self, role: Role) -> bool {
        if self.block_input_grad {
            return true;
        }
        let Some(l) = self.lora else {
            return true;
        };
        let any = |roles: &[Role]| roles.iter().any(|r| l.targets.has(*r));
        const QKV: [Role; 5] = [Role::Q, Role::K, Role::V, Role::Qkv, Role::QueryKeyValue];
        const MLP_IN: [Role; 4] = [Role::Gate, Role::Up, Role::GateUp, Role::DenseHTo4h];
        // A parallel residual (GPT-NeoX) feeds the MLP the block input, not the attention's output.
        let after_attn =
            !self.arch.parallel_residual && (any(&QKV) || any(&[Role::O, Role::Dense]));
        match role {
            Role::Q | Role::K | Role::V | Role::Qkv | Role::QueryKeyValue => false,
            Role::O | Role::Dense => any(&QKV),
            Role::Gate | Role::Up | Role::GateUp | Role::DenseHTo4h => after_attn,
            Role::Router | Role::SharedExpertGate => after_attn,
            Role::Down | Role::Dense4hToH => after_attn || any(&MLP_IN),
        }
    }

    /// Lets go of what autograd nodes held outside their saved tensors (`graph_holds`): their graph was freed.
    pub fn release_graph_holds(&mut self) {
        for t in std::mem::take(&mut self.graph_holds) {
            self.sim.release_hold(t);
        }
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

    /// An `addmm` whose added operand is a 2-D matrix of `elem_bytes` per element (its output already allocated):
    /// cuBLASLt's workspace in fp16 or bf16, cuBLAS's in fp32 (`CUBLASLT_WORKSPACE_BYTES`).
    pub fn addmm_matrix_workspace(&mut self, elem_bytes: u64) {
        if elem_bytes == 2 {
            self.addmm_workspace();
        } else {
            self.matmul_workspace();
        }
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
    /// The weight needs no gradient (a base Linear under LoRA): the input is not saved, no weight gradient.
    pub frozen: bool,
    /// Autocast cast the input to 2 bytes (saved in `input_cast` unless the Linear is frozen): the input's
    /// gradient comes back through `ToCopyBackward0` in 4 bytes.
    pub input_was_cast: bool,
    /// The LoRA adapter on this Linear (peft's `lora.Linear`), when it has one.
    pub adapter: Option<Box<AdapterSaved>>,
    /// Bytes per element of the output: the matmul dtype, or a quantized Linear's input dtype (bitsandbytes
    /// returns it in that dtype).
    pub out_bytes: u64,
    /// Bytes per element of the input as it came to the Linear.
    pub in_bytes: u64,
    /// A bitsandbytes weight (`Linear4bit`, `Linear8bitLt`): its backward dequantizes it again.
    pub quant: Option<finetune::Quantization>,
    /// The weight is a parametrization's output (peft's `ParamWrapper` on a mixture of experts' router): its
    /// gradient goes on into the parametrization's graph (`moe::router_adapter_bwd`), not to a `.grad`.
    pub parametrized: bool,
}

impl LinearSaved {
    /// Whether this Linear (or its adapter) holds its input tensor itself until its backward: a trainable
    /// weight's gradient needs the input as it came (no autocast cast), and an adapter that made no copy of its
    /// input saved it as it came.
    pub fn holds_input(&self) -> bool {
        let own = !self.frozen && self.input_cast.is_none();
        own || self.adapter.as_ref().is_some_and(|a| a.holds_x)
    }

    /// Whether the input gradient this Linear's backward returns is a tensor of its own that autograd's input
    /// buffer may add a later gradient into in place (`grad_accumulate`): the fp32 output of the input cast's
    /// backward (`ToCopyBackward0`) under autocast. Without a cast it is a view of `mm`'s output (the 3-D input
    /// was reshaped for the matmul), and a view keeps its base. An adapted or quantized Linear's is taken as out
    /// of place (not measured).
    pub fn input_grad_fresh(&self) -> bool {
        self.input_was_cast && self.adapter.is_none() && self.quant.is_none()
    }

    /// Every Linear this one is made of (itself, and its adapter's A and B), for releasing them together.
    pub fn parts(&self) -> Vec<&LinearSaved> {
        let mut v = vec![self];
        if let Some(a) = &self.adapter {
            v.extend([&a.a, &a.b]);
        }
        v
    }

    /// Tensors an adapter keeps that are not a Linear's own casts (for releasing a checkpointed block).
    pub fn adapter_tensors(&self) -> Vec<Option<Tensor>> {
        match &self.adapter {
            Some(a) => vec![a.a_input, a.mask, Some(a.a_out)],
            None => vec![],
        }
    }
}

/// The weight a Linear multiplies by: its dtype and whether it is trained.
#[derive(Debug, Clone, Copy)]
pub struct Weight {
    pub bytes: u64,
    pub trainable: bool,
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
    let w = Weight {
        bytes: cx.pb,
        trainable: true,
    };
    linear_fwd_as(cx, input_bytes, in_f, out_f, bias, out_category, w)
}

/// `linear_fwd` for a weight of its own dtype, trained or frozen. Autocast casts only a 4-byte weight (a bf16
/// weight under bf16 autocast is saved as itself: `tests/data/finetune/README.md`, frozen base Linear). A frozen
/// weight's `MmBackward0` saves only the weight (or its cast) for the input's gradient: the input is not saved,
/// and an fp32 input's 2-byte cast dies with the matmul (`saved-per-linear.json`).
pub fn linear_fwd_as(
    cx: &mut Ctx,
    input_bytes: u64,
    in_f: u64,
    out_f: u64,
    bias: bool,
    out_category: Category,
    w: Weight,
) -> (Tensor, LinearSaved) {
    let mut saved = linear_casts(cx, input_bytes, in_f, out_f, bias, w);
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
    // cast is freed right after its GEMM's workspace); a frozen weight never saves it.
    if let Some(t) = saved.input_cast {
        if saved.frozen {
            cx.free(t);
            saved.input_cast = None;
        } else {
            cx.drop_unsaved(t);
        }
    }
    (y, saved)
}

/// A trained Linear's forward up to the point where autograd saves its inputs, before the matmul runs
/// (`VariableType` sets a node's saved inputs before it calls the kernel): autocast's casts, no output. Where
/// a checkpointed block's recompute stops, having repacked its last saved tensor (`Ctx::recompute_stop`).
pub fn linear_fwd_packed(
    cx: &mut Ctx,
    input_bytes: u64,
    in_f: u64,
    out_f: u64,
    bias: bool,
) -> LinearSaved {
    let w = Weight {
        bytes: cx.pb,
        trainable: true,
    };
    linear_casts(cx, input_bytes, in_f, out_f, bias, w)
}

/// What `linear_fwd_as` allocates before its matmul: autocast's bias, weight and input casts.
fn linear_casts(
    cx: &mut Ctx,
    input_bytes: u64,
    in_f: u64,
    out_f: u64,
    bias: bool,
    w: Weight,
) -> LinearSaved {
    let mut saved = LinearSaved {
        input_cast: None,
        weight_cast: None,
        in_f,
        out_f,
        bias,
        frozen: !w.trainable,
        input_was_cast: false,
        adapter: None,
        out_bytes: cx.p,
        in_bytes: input_bytes,
        quant: None,
        parametrized: false,
    };
    if cx.prec.autocast() {
        if w.bytes == 4 {
            if bias {
                let c = cx.alloc(out_f * 2, WeightCopies, "_to_copy");
                cx.autocast_cache.push(c);
            }
            saved.weight_cast = Some(cx.alloc(in_f * out_f * 2, WeightCopies, "_to_copy"));
        }
        if input_bytes == 4 {
            saved.input_was_cast = true;
            saved.input_cast = Some(cx.alloc(cx.n * in_f * 2, Activations, "_to_copy"));
        }
    }
    saved
}

/// What peft's `lora.Linear` keeps besides its base Linear's (`tests/data/finetune/README.md`, LoRA adapter).
pub struct AdapterSaved {
    /// `_cast_input_dtype` copied the input (its dtype differs from the adapter's).
    copied: bool,
    /// Bytes per element of what the dropout and A read: the adapter's dtype after the copy, else the input's.
    drop_bytes: u64,
    /// The dropout mask (`lora_dropout` > 0), when its input needs a gradient (else `NativeDropoutBackward0` is
    /// not recorded and the mask dies with the op).
    mask: Option<Tensor>,
    /// A's input when A saved it itself (no autocast cast) and it is the adapter's own tensor (the dropout output
    /// or the dtype copy).
    a_input: Option<Tensor>,
    /// A saved the Linear's input itself (no copy, no dropout, no cast: pure bf16 or fp32 without dropout, or a
    /// 2-byte input to peft's bnb layers under autocast).
    pub holds_x: bool,
    a: LinearSaved,
    /// A's output, saved by B as its input.
    a_out: Tensor,
    b: LinearSaved,
}

/// A projection of a decoder layer on `input` (`input_bytes` per element): a plain Linear, or under LoRA the frozen
/// base Linear (a bitsandbytes one on a quantized base) and, when `role` is adapted, its adapter (`adapter_fwd`).
pub fn proj_fwd(
    cx: &mut Ctx,
    role: Role,
    (input, input_bytes): (Tensor, u64),
    (in_f, out_f): (u64, u64),
    bias: bool,
    out_category: Category,
) -> (Tensor, LinearSaved) {
    let Some(lora) = cx.lora else {
        return linear_fwd(cx, input_bytes, in_f, out_f, bias, out_category);
    };
    let base = Weight {
        bytes: cx.pb,
        trainable: false,
    };
    let x_grad = cx.role_input_grad(role);
    let (mut y, mut saved) = match cx.quant {
        Some(Quantization::Int8) => linear8bit_fwd(
            cx,
            (input, input_bytes),
            (in_f, out_f, bias),
            out_category,
            x_grad,
        ),
        Some(q) => linear4bit_fwd(cx, input_bytes, (in_f, out_f, bias), out_category, q),
        None => linear_fwd_as(cx, input_bytes, in_f, out_f, bias, out_category, base),
    };
    if !lora.targets.has(role) {
        return (y, saved);
    }
    let base_bytes = saved.out_bytes;
    // peft's `lora.bnb.Linear4bit.forward` clones the base output before adding the adapter's ("defensively",
    // its comment says): a copy in the output's dtype, the original freed (the re-measured QLoRA snapshots:
    // `result.clone()` after each Linear4bit). Its 8-bit layer does not.
    if matches!(
        cx.quant,
        Some(Quantization::Nf4 { .. } | Quantization::Fp4 { .. })
    ) {
        let c = cx.alloc(cx.n * out_f * base_bytes, out_category, "clone");
        cx.free(y);
        y = c;
    }
    let (out, adapter) = adapter_fwd(
        cx,
        lora,
        (input_bytes, x_grad),
        (in_f, out_f),
        (y, base_bytes),
        out_category,
    );
    saved.adapter = Some(Box::new(adapter));
    // `result + lora_B(...)`: the sum takes the wider dtype (an fp32 `Linear4bit` output stays fp32).
    saved.out_bytes = base_bytes.max(cx.p);
    (out, saved)
}

/// bitsandbytes 0.50.2's `Linear4bit.forward` on n tokens (tests/data/finetune/README.md, Linear4bit): the input
/// cast to the compute dtype (bf16; an fp32 input, after prepare_model_for_kbit_training's fp32 norms, makes an
/// n x in copy), `MatMul4Bit`: for n above 1536 tokens `dequantize_4bit` (under double quantization the absmax
/// dequantized and offset, fp32 per block of 64, then the weight, bf16 out x in) and `F.linear` (the GEMM and
/// cuBLAS's workspace), all transient; then the output cast back to the input's dtype (n x out fp32 for an fp32
/// input, the bf16 result freed). Nothing is saved: the packed weight is a parameter, the input not kept. Up to
/// 1536 tokens bnb's fused kernel writes the output only. A bias (fp32 after prepare_model_for_kbit_training)
/// is cast to the compute dtype first, transient, and the GEMM takes it (cuBLASLt's `addmm`).
pub fn linear4bit_fwd(
    cx: &mut Ctx,
    input_bytes: u64,
    (in_f, out_f, bias): (u64, u64, bool),
    out_category: Category,
    q: Quantization,
) -> (Tensor, LinearSaved) {
    let (p, double_quant) = (cx.p, q.double_quant());
    let bias_cast = bias.then(|| cx.alloc(out_f * p, Temporary, "_to_copy"));
    let cast = (input_bytes != p).then(|| cx.alloc(cx.n * in_f * p, Temporary, "_to_copy"));
    let dequant =
        (cx.n > BNB_FUSED_MAX_TOKENS).then(|| dequantize_4bit(cx, in_f * out_f, double_quant));
    let wide = input_bytes != p;
    let y = cx.alloc(
        cx.n * out_f * p,
        if wide { Temporary } else { out_category },
        "mm",
    );
    match (dequant.is_some(), bias) {
        (true, true) => cx.addmm_workspace(),
        (true, false) => cx.matmul_workspace(),
        _ => {}
    }
    if let Some(w) = dequant {
        cx.free(w);
    }
    if let Some(b) = bias_cast {
        cx.free(b);
    }
    let out = if wide {
        let o = cx.alloc(cx.n * out_f * input_bytes, out_category, "_to_copy");
        cx.free(y);
        o
    } else {
        y
    };
    if let Some(c) = cast {
        cx.free(c);
    }
    let saved = LinearSaved {
        input_cast: None,
        weight_cast: None,
        in_f,
        out_f,
        bias,
        frozen: true,
        input_was_cast: wide,
        adapter: None,
        out_bytes: input_bytes,
        in_bytes: input_bytes,
        quant: Some(q),
        parametrized: false,
    };
    (out, saved)
}

/// Up to this many tokens (rows of the input) bitsandbytes' `gemm_4bit` runs its fused kernel on the packed weight;
/// above, it dequantizes the weight and calls `F.linear` (tests/data/finetune/README.md, Linear4bit forward).
const BNB_FUSED_MAX_TOKENS: u64 = 1536;

/// `dequantize_4bit` of a weight of `elems` elements: the fp32 absmax temporaries of double quantization (made
/// and freed first), then the bf16 weight, returned (the caller frees it after its GEMM).
fn dequantize_4bit(cx: &mut Ctx, elems: u64, double_quant: bool) -> Tensor {
    if let Some(bytes) = finetune::dequant_absmax_bytes(elems, double_quant) {
        let absmax = cx.alloc(bytes, Temporary, "dequantize_blockwise");
        let offset = cx.alloc(bytes, Temporary, "add");
        cx.free(absmax);
        let w = cx.alloc(elems * 2, Temporary, "dequantize_4bit");
        cx.free(offset);
        return w;
    }
    cx.alloc(elems * 2, Temporary, "dequantize_4bit")
}

/// bitsandbytes 0.50.2's `Linear8bitLt.forward` (LLM.int8(), `has_fp16_weights=False`, `llm_int8_threshold` 6.0,
/// transformers' default) on n tokens, through `MatMul8bitLt` (read from `autograd/_functions.py` and
/// `backends/cuda/ops.py`; the order is the stub-cuda snapshot of `llama-int8-r16-qv-bf16amp`):
/// - `A.to(float16)`: an n x in fp16 copy (none for an fp16 input), alive until the quantization returns;
/// - `int8_vectorwise_quant(A16, threshold)`: the row scales fp32 [n], the int8 input n x in, and for the outlier
///   test `A.abs()` fp16 n x in (freed at once) and `>= threshold`, a bool n x in alive until it returns, with
///   `outliers.any()`'s three sub-512-byte tensors; on the stub the input reads as zeros, so no column is an
///   outlier (`finetune::int8_outlier_bound_bytes` for what a real run adds at most);
/// - `int8_scaled_mm` (the weight needs no gradient, so no column-wise copy of the input): bnb's own cuBLASLt GEMM
///   into an int32 n x out (it takes no workspace from PyTorch's allocator: none in the snapshot), dequantized to
///   fp16 n x out, then cast to the input's dtype (none for fp16), the int32 and fp16 freed; a bias is added in
///   place;
/// - the int8 input and its scales freed when the forward returns.
///
/// Nothing is saved for backward, but when its input needs a gradient the Function keeps that input in
/// `ctx.tensors` (not `save_for_backward`), so it lives until the graph is freed (`Sim::hold`): past its block's
/// backward, and through checkpointing's first forward (snapshot of `llama-int8-r16-all-ckpt-lion8bit`: every
/// block's norm outputs, SDPA output and MLP product live at the loss). The output comes back in the input's dtype.
fn linear8bit_fwd(
    cx: &mut Ctx,
    (input, input_bytes): (Tensor, u64),
    (in_f, out_f, bias): (u64, u64, bool),
    out_category: Category,
    input_grad: bool,
) -> (Tensor, LinearSaved) {
    let (n, fp16) = (cx.n, is_fp16(cx, input_bytes));
    let a16 = (!fp16).then(|| cx.alloc(n * in_f * 2, Temporary, "_to_copy"));
    let row_stats = cx.alloc(n * 4, Temporary, "int8_vectorwise_quant");
    let ca = cx.alloc(n * in_f, Temporary, "int8_vectorwise_quant");
    let abs = cx.alloc(n * in_f * 2, Temporary, "abs");
    let outliers = cx.alloc(n * in_f, Temporary, "ge");
    cx.free(abs);
    let any: Vec<Tensor> = (0..3).map(|_| cx.alloc(1, Temporary, "any")).collect();
    for t in any.into_iter().rev() {
        cx.free(t);
    }
    cx.free(outliers);
    if let Some(t) = a16 {
        cx.free(t);
    }
    let i32_out = cx.alloc(n * out_f * 4, Temporary, "int8_linear_matmul");
    let f16_out = cx.alloc(
        n * out_f * 2,
        if fp16 { out_category } else { Temporary },
        "int8_mm_dequant",
    );
    let out = if fp16 {
        f16_out
    } else {
        let o = cx.alloc(n * out_f * input_bytes, out_category, "_to_copy");
        cx.free(f16_out);
        o
    };
    cx.sim.free_all(&[i32_out, ca, row_stats]);
    if input_grad {
        cx.sim.hold(input);
        cx.graph_holds.push(input);
    }
    let saved = LinearSaved {
        input_cast: None,
        weight_cast: None,
        in_f,
        out_f,
        bias,
        frozen: true,
        input_was_cast: false,
        adapter: None,
        out_bytes: input_bytes,
        in_bytes: input_bytes,
        quant: Some(Quantization::Int8),
        parametrized: false,
    };
    (out, saved)
}

/// Whether a tensor of `bytes` per element is fp16: a 2-byte activation under fp16 autocast (the fp16 base's
/// dtype too); under bf16 autocast 2-byte activations are bf16.
fn is_fp16(cx: &Ctx, bytes: u64) -> bool {
    bytes == 2 && cx.prec == Precision::Fp16Amp
}

/// `MatMul8bitLt.backward` for the input's gradient (the weight needs none): the weight dequantized in the input's
/// dtype (`CB.to(dtype_A, copy=True)` out x in, scaled in place by `SCB / 127`, an fp32 [out] temporary), then
/// `grad_output.to(dtype_A) @ CB` through PyTorch's matmul (n x in in the input's dtype, and cuBLAS's
/// workspace); the dequantized weight is freed when it returns (stub-cuda snapshot of
/// `llama-int8-r16-qv-bf16amp`: 3 MiB fp32 for up_proj's 1536 x 512 on its fp32 input, 0.5 MiB bf16 for o_proj's
/// on SDPA's bf16 output). The incoming gradient arrives in the output's dtype (the engine casts it), which is
/// the input's.
fn linear8bit_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    grad_out_bytes: u64,
    release_grad_out: bool,
    saved: LinearSaved,
) -> Tensor {
    let (n, da) = (cx.n, saved.in_bytes);
    let cast =
        (grad_out_bytes != da).then(|| cx.alloc(n * saved.out_f * da, Temporary, "_to_copy"));
    if cast.is_some() && release_grad_out {
        cx.free(grad_out);
    }
    let cb = cx.alloc(saved.out_f * saved.in_f * da, Temporary, "_to_copy");
    let scale = cx.alloc(saved.out_f * 4, Temporary, "mul");
    cx.free(scale);
    let grad_in = cx.alloc(n * saved.in_f * da, Temporary, "mm");
    cx.matmul_workspace();
    cx.free(cb);
    match cast {
        Some(c) => cx.free(c),
        None if release_grad_out => cx.free(grad_out),
        None => {}
    }
    grad_in
}

/// peft 0.21.2's `lora.Linear.forward` after the base Linear: `x = _cast_input_dtype(x, A's dtype)` (a copy when
/// the dtypes differ, alive until the forward returns), `dropout(x)` (`native_dropout`: output and a bool mask,
/// the mask saved; `nn.Identity` at 0), A (`K -> r`) and B (`r -> N`) as trainable Linears in the adapter's
/// dtype (under autocast each saves its 2-byte weight cast, A its 2-byte input cast, B A's output), `* scaling`
/// (a new tensor) and `result + ...` (a new tensor; the base output dies). Returns the sum and what it saved.
///
/// On a quantized base peft wraps the Linear in its bnb layer (`lora.bnb.Linear4bit` / `Linear8bitLt`), which
/// under autocast skips the cast (`requires_conversion = not torch.is_autocast_enabled()`): dropout and A read x
/// in its own dtype, and A's autocast casts it only when it is 4 bytes (tests/data/finetune/README.md, peft's bnb
/// LoRA layers). `x_grad`: whether x needs a gradient; without one the dropout mask is not saved.
fn adapter_fwd(
    cx: &mut Ctx,
    lora: &LoraConfig,
    (xb, x_grad): (u64, bool),
    (k, n_out): (u64, u64),
    (base_y, base_bytes): (Tensor, u64),
    out_category: Category,
) -> (Tensor, AdapterSaved) {
    let (ab, p, nk) = (cx.ab, cx.p, cx.n * k);
    let converts = cx.quant.is_none() || !cx.prec.autocast();
    let copy = (converts && xb != ab).then(|| cx.alloc(nk * ab, Temporary, "_to_copy"));
    let db = if copy.is_some() { ab } else { xb };
    let dropped = (lora.dropout > 0.0).then(|| {
        let (o, mask) = ops_dropout(cx, nk, db);
        if !x_grad {
            cx.free(mask);
        }
        (o, x_grad.then_some(mask))
    });
    let trainable = Weight {
        bytes: ab,
        trainable: true,
    };
    let (a_out, a) = linear_fwd_as(cx, db, k, lora.r, false, Activations, trainable);
    // A saved its own 2-byte cast (autocast) or the input as it came: then the dropout output or the copy, or x.
    let a_holds = a.input_cast.is_none() && cx.saving;
    let a_own_input = dropped.map(|(o, _)| o).or(copy);
    let (a_input, holds_x) = if a_holds {
        (a_own_input, a_own_input.is_none())
    } else {
        // The dropout output was a temporary of the call (freed when A returns).
        if let Some((o, _)) = dropped {
            cx.free(o);
        }
        (None, false)
    };
    let (b_out, b) = linear_fwd_as(cx, p, lora.r, n_out, false, Temporary, trainable);
    let scaled = cx.alloc(cx.n * n_out * p, Temporary, "mul");
    cx.free(b_out);
    let out = cx.alloc(cx.n * n_out * p.max(base_bytes), out_category, "add");
    cx.free(scaled);
    cx.free(base_y);
    // peft's `x` (the dtype copy) is bound until the forward returns, unless A saved it.
    if let Some(c) = copy {
        if a_input != Some(c) {
            cx.free(c);
        }
    }
    cx.drop_unsaved(a_out);
    let saved = AdapterSaved {
        copied: copy.is_some(),
        drop_bytes: db,
        mask: dropped.and_then(|(_, m)| m),
        a_input,
        holds_x,
        a,
        a_out,
        b,
    };
    (out, saved)
}

fn ops_dropout(cx: &mut Ctx, elems: u64, bytes: u64) -> (Tensor, Tensor) {
    dropout_fwd(cx, elems, bytes, Temporary)
}

/// Backward of an adapted Linear (`proj_fwd`): `AddBackward0` hands the output's gradient to both branches;
/// the adapter's nodes were made after the base's matmul, so the engine runs them first: `* scaling`'s (a new
/// tensor), B's and A's backward (their weight gradients to `.grad` in the adapter's dtype, A's input gradient
/// back to 4 bytes through its cast), dropout's, `_cast_input_dtype`'s (back to x's dtype); then the base's
/// input gradient, and the two summed by the engine's input buffer.
fn adapted_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    grad_out_bytes: u64,
    release_grad_out: bool,
    mut saved: LinearSaved,
    saved_input: Option<Tensor>,
    xb: u64,
) -> Tensor {
    let Some(ad) = saved.adapter.take() else {
        return linear_bwd(
            cx,
            grad_out,
            grad_out_bytes,
            release_grad_out,
            saved,
            saved_input,
        );
    };
    let ad = *ad;
    let p = cx.p;
    let n_out = saved.out_f;
    let nk = cx.n * saved.in_f;
    // `AddBackward0` hands the sum's gradient to both branches and the engine casts it to each one's output dtype.
    // A base in the matmul dtype shares one cast with the adapter; a quantized base returns its input's dtype
    // (fp32 on the fp32 stream), which then takes the gradient as it came while the adapter gets a cast.
    let base_out = if saved.quant.is_some() {
        saved.in_bytes
    } else {
        p
    };
    let (g_base, base_owned, g_ad) = if base_out == p {
        let (g, owned) = if grad_out_bytes != p {
            let c = cx.alloc(cx.n * n_out * p, Temporary, "_to_copy");
            if release_grad_out {
                cx.free(grad_out);
            }
            (c, true)
        } else {
            (grad_out, release_grad_out)
        };
        (g, owned, None)
    } else {
        let base_cast = (grad_out_bytes != base_out)
            .then(|| cx.alloc(cx.n * n_out * base_out, Temporary, "_to_copy"));
        let ad_cast =
            (grad_out_bytes != p).then(|| cx.alloc(cx.n * n_out * p, Temporary, "_to_copy"));
        match base_cast {
            Some(c) => {
                if ad_cast.is_some() && release_grad_out {
                    cx.free(grad_out);
                }
                (c, true, ad_cast)
            }
            None => (grad_out, release_grad_out, ad_cast),
        }
    };
    // The adapter reads the incoming gradient itself when the base took a cast of it and the adapter none: it
    // goes once `* scaling`'s backward has read it (a 2-byte gradient reaching a quantized Linear on the fp32
    // stream: OLMo 2's post-norms hand down_proj one).
    let ad_reads_grad_out = base_owned && g_ad.is_none() && base_out != p && release_grad_out;
    let g_scaled = cx.alloc(cx.n * n_out * p, Temporary, "mul");
    if let Some(c) = g_ad {
        cx.free(c);
    }
    if ad_reads_grad_out && g_base != grad_out {
        cx.free(grad_out);
    }
    let g_a_out = linear_bwd(cx, g_scaled, p, true, ad.b, Some(ad.a_out));
    let mut g_x = linear_bwd(cx, g_a_out, p, true, ad.a, ad.a_input);
    // A's input gradient is in the dtype it read (its cast's backward brings an autocast cast back to 4 bytes).
    if let Some(mask) = ad.mask {
        g_x = dropout_bwd(cx, g_x, true, nk, ad.drop_bytes, mask);
    }
    if ad.copied {
        let c = cx.alloc(nk * xb, Temporary, "_to_copy");
        cx.free(g_x);
        g_x = c;
    }
    let g_base = linear_bwd(cx, g_base, base_out, base_owned, saved, saved_input);
    // The autograd engine's input buffer holds the adapter's gradient (it arrived first, and nothing else refers
    // to it) and adds the base's into it in place (`InputBuffer::accumulate`): no new buffer, the base's freed
    // (stub-cuda snapshot of `llama-int8-r16-all-bf16amp`: down_proj's n x 1536 fp32 input gradients).
    cx.free(g_base);
    g_x
}

/// Two gradients of the same tensor summed by the autograd engine's input buffer: out of place (a new buffer),
/// then both addends are released. The buffer adds out of place when the gradient it holds (`a`, the first to
/// arrive) is not its alone: a view (a Linear's input gradient on a 3-D input is a view of `mm`'s output, and the
/// view keeps its base), or a tensor another node still reads; else it adds in place (`grad_add_into`).
pub fn grad_sum(cx: &mut Ctx, a: Tensor, b: Tensor, n_bytes: u64) -> Tensor {
    let sum = cx.alloc(n_bytes, Temporary, "add");
    cx.free(a);
    cx.free(b);
    sum
}

/// A gradient `g` added into the gradient `acc` the autograd engine's input buffer already holds, when the buffer
/// holds the only reference to `acc` and its storage and `acc` is dense (`InputBuffer::accumulate` and
/// `can_accumulate_inplace`, torch/csrc/autograd/input_buffer.cpp, torch 2.15; GradMode is off in a backward that
/// builds no graph): `acc.add_(g)`, no new buffer; `g` dies once added. The residual stream's gradient is such a
/// buffer: the final norm's first path makes it, and every block's norms add into it (stub-cuda snapshots of
/// llama-tiny-fp32-mha and llama-tiny-bf16amp-gqa: no `add` in any block's residual, the norms' input gradients
/// freed as they arrive, one N x C block carrying the residual gradient through the whole backward).
pub fn grad_add_into(cx: &mut Ctx, acc: Tensor, g: Tensor) -> Tensor {
    cx.free(g);
    acc
}

/// A gradient `g` reaching the input buffer that holds `acc` (`n_bytes` each): added into `acc` in place when
/// the buffer holds it alone and it is no view (`acc_fresh`: `grad_add_into`), else summed out of place
/// (`grad_sum`). The result is the buffer's alone either way, so a third gradient is added into it in place
/// (stub-cuda snapshots of llama-tiny-fp32-mha: one `add` for q, k and v's input gradients, none for
/// llama-tiny-bf16amp-gqa's, whose first is v's cast back to fp32).
pub fn grad_accumulate(
    cx: &mut Ctx,
    (acc, acc_fresh): (Tensor, bool),
    g: Tensor,
    n_bytes: u64,
) -> Tensor {
    if acc_fresh {
        grad_add_into(cx, acc, g)
    } else {
        grad_sum(cx, acc, g, n_bytes)
    }
}

/// The autograd engine's input buffer a norm's input gradient lands in (`InputBuffer::accumulate`).
#[derive(Clone, Copy, Default)]
pub struct InputBuffer {
    /// The gradient it already holds alone (the residual stream's, a block's norms): what lands is added into it
    /// in place (`grad_add_into`).
    pub holds: Option<Tensor>,
    /// The norm runs on DTensors (sequence parallel's norms on the residual stream): a tensor subclass, which the
    /// buffer never adds into in place, so the norm's two paths are summed out of place before `from_local`'s
    /// backward hands the local sum to the stream's buffer (stub-cuda record of llama-tp4-sp: the final norm's
    /// `add` is at its peak).
    pub dtensor: bool,
}

/// The input a Linear read, once the caller lets go of it: kept when the Linear saved it itself (no autocast),
/// freed when the Linear saved its own 2-byte cast instead (autocast), since nothing else holds it then.
pub fn keep_if_saved(cx: &mut Ctx, input: Tensor, linear: &LinearSaved) -> Option<Tensor> {
    keep_if(cx, input, linear.holds_input())
}

/// `keep_if_saved` for an input several Linears read: kept when any of them holds it (`holds`).
pub fn keep_if(cx: &mut Ctx, input: Tensor, holds: bool) -> Option<Tensor> {
    if !holds || !cx.saving {
        cx.free(input);
        None
    } else {
        Some(input)
    }
}

/// A parameter's gradient arriving from its op's backward (`computed`, in matmul dtype) and landing in `.grad`.
/// AccumulateGrad steals the first gradient of a step when its dtype matches the parameter; under autocast the
/// gradient of the weight cast (`cast`) first goes through `_to_copy` back to fp32 (ToCopyBackward). A later
/// micro-step adds into the existing `.grad` in place.
fn param_grad(cx: &mut Ctx, computed: Tensor, elems: u64, cast: bool) {
    let converted = if cast {
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

fn grad_category(cx: &Ctx, cast: bool) -> Category {
    if cast || cx.have_grads {
        Temporary
    } else {
        Grads
    }
}

/// Backward of `linear_fwd`: `mm` for the weight gradient (out_f x in_f), `mm` for the input gradient
/// (n x in_f) and `sum` for the bias gradient, all in matmul dtype; an fp32 gradient arriving from the
/// residual stream is first cast down to the output's dtype by the autograd engine (`validate_outputs`). Then
/// the saved cast input and weight copy are released, and the casts' backward (`_to_copy`) brings the input
/// gradient back to fp32 and the weight gradient to `.grad`. A frozen weight gets no gradient (only the input's
/// `mm`); an adapted Linear runs its adapter's backward first (`adapted_bwd`).
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
    if saved.adapter.is_some() {
        let xb = saved.in_bytes;
        return adapted_bwd(
            cx,
            grad_out,
            grad_out_bytes,
            release_grad_out,
            saved,
            saved_input,
            xb,
        );
    }
    if saved.quant == Some(Quantization::Int8) {
        let g = linear8bit_bwd(cx, grad_out, grad_out_bytes, release_grad_out, saved);
        // The input the caller kept for this Linear (its adapter saved it as it came) is let go as for any
        // Linear; `MatMul8bitLt`'s own hold on it keeps it until the graph is freed (stub-cuda record of
        // phi3-int8-r16-all-nodrop: without this each step's o_proj inputs outlived the step).
        if let Some(t) = saved_input {
            cx.free(t);
        }
        return g;
    }
    let cast = (grad_out_bytes != cx.p)
        .then(|| cx.alloc(cx.n * saved.out_f * cx.p, Temporary, "_to_copy"));
    if cast.is_some() && release_grad_out {
        cx.free(grad_out);
    }
    // A generated backward node computes its inputs' gradients in the order of their names, sorted
    // (torchgen's `load_derivatives.py` sorts each derivatives.yaml entry's keys): `MmBackward0` (no bias)
    // the weight's (`mat2`) before the input's (`self`), as the stub-cuda snapshots of nanogpt-30m-b4 and
    // llama-3.2-1b-tied show in every block; `AddmmBackward0` (a bias) the input's (`mat1`) before the weight's
    // (`mat2`), as the one of preset-pythia-1b-b4-t2048-fp16amp shows in every block.
    let params_cast = saved.weight_cast.is_some();
    let cat = grad_category(cx, params_cast);
    let weight_grad = |cx: &mut Ctx| {
        (!saved.frozen).then(|| {
            let g = cx.alloc(saved.out_f * saved.in_f * cx.p, cat, "mm");
            cx.matmul_workspace();
            g
        })
    };
    let input_first = saved.bias;
    let mut gw = if input_first { None } else { weight_grad(cx) };
    // `MatMul4BitBackward`: the weight dequantized again for the input's gradient, freed after its GEMM.
    let dequant = saved
        .quant
        .map(|q| dequantize_4bit(cx, saved.in_f * saved.out_f, q.double_quant()));
    let grad_in = cx.alloc(cx.n * saved.in_f * cx.p, Temporary, "mm");
    cx.matmul_workspace();
    if let Some(w) = dequant {
        cx.free(w);
    }
    if input_first {
        gw = weight_grad(cx);
    }
    // The bias's gradient: the engine reduces `addmm`'s n x out_f gradient to the bias's shape (`sum_to` in
    // `validate_outputs`), a CUDA reduction over the rows with its global scratch (`column_sum_scratch`; the
    // snapshot of preset-pythia-1b-b4-t2048-fp16amp: 128 MiB for 8192 x 2048, 132 MiB for 8192 x 8192).
    let gb = (saved.bias && !saved.frozen).then(|| {
        let g = cx.alloc(saved.out_f * cx.p, cat, "sum");
        if let Some((buffer, semaphores)) =
            column_sum_scratch(cx.n, saved.out_f, u64::from(cx.sms), cx.sm)
        {
            let b = cx.alloc(buffer, Temporary, "sum");
            let s = cx.alloc(semaphores, Temporary, "sum");
            cx.sim.free_all(&[s, b]);
        }
        g
    });
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
    let grad_in = if saved.input_was_cast {
        let wide = cx.alloc(cx.n * saved.in_f * 4, Temporary, "_to_copy");
        cx.free(grad_in);
        wide
    } else {
        grad_in
    };
    if let Some(gw) = gw {
        if saved.parametrized {
            // Handed to the parametrization's backward, which makes its own gradients from it at once (a few KiB:
            // a router's E x C).
            cx.free(gw);
        } else {
            param_grad(cx, gw, saved.out_f * saved.in_f, params_cast);
        }
    }
    if let Some(gb) = gb {
        param_grad(cx, gb, saved.out_f, params_cast);
    }
    grad_in
}

/// What a LayerNorm / RMSNorm keeps besides its input.
pub struct NormSaved {
    pub stats: [Option<Tensor>; 2],
    /// Tensors of the norm's own making that its backward needs: an RMSNorm's fp32 copy of a 2-byte input
    /// (saved by `pow` and `x * rsqrt`) and the normalised x (saved by the weight multiply).
    pub own: [Option<Tensor>; 2],
    /// Llama's RMSNorm on a 2-byte input with 2-byte weights: the weight multiply ran in 2 bytes on the
    /// normalised x cast down, so its gradients are 2-byte and the cast's backward brings x's back to fp32.
    pub lp_product: bool,
}

impl NormSaved {
    /// No norm (OLMo 2 has none before its branches).
    pub fn none() -> NormSaved {
        NormSaved {
            stats: [None, None],
            own: [None, None],
            lp_product: false,
        }
    }
}

/// `F.layer_norm` (`native_layer_norm`): output n x C in the input's dtype, mean and rstd fp32 [n]. Saves input,
/// weight, bias, mean, rstd. layer_norm is on autocast's fp32 list: a 2-byte stream under autocast (a bf16 base,
/// LoRA's) is cast to fp32 first, the cast saved as the input, and the output is fp32 (stub-cuda snapshot of
/// neox-lora-r16-all-bf16amp: both norms' 4 MiB casts kept in every block whose input needs a gradient).
pub fn layer_norm_fwd(cx: &mut Ctx) -> (Tensor, NormSaved) {
    let c = cx.m.n_embd;
    let wide = layer_norm_widens(cx);
    let copy = wide.then(|| cx.alloc(cx.ns * c * 4, Activations, "_to_copy"));
    let out_bytes = if wide { 4 } else { cx.r };
    let out = cx.alloc(cx.ns * c * out_bytes, Activations, "native_layer_norm");
    let mean = cx.alloc(cx.ns * 4, Activations, "native_layer_norm");
    let rstd = cx.alloc(cx.ns * 4, Activations, "native_layer_norm");
    cx.drop_unsaved(mean);
    cx.drop_unsaved(rstd);
    if let Some(t) = copy {
        cx.drop_unsaved(t);
    }
    (
        out,
        NormSaved {
            stats: [Some(mean), Some(rstd)],
            own: [copy, None],
            lp_product: false,
        },
    )
}

/// Whether `F.layer_norm` runs on an fp32 cast of a 2-byte stream (autocast's fp32 list).
pub fn layer_norm_widens(cx: &Ctx) -> bool {
    cx.prec.autocast() && cx.r != 4
}

/// `native_layer_norm_backward`: grad input n x C, grad weight and bias [C] (to `.grad`); then the incoming
/// gradient, the saved input and the statistics are released.
///
/// `into`: the residual gradient the input's buffer already holds, which the input gradient is added into in
/// place (`grad_add_into`) once the node has released what it read.
pub fn layer_norm_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    saved: NormSaved,
    input: Option<Tensor>,
    bias: bool,
    into: Option<Tensor>,
) -> Tensor {
    let c = cx.m.n_embd;
    // On autocast's fp32 cast of the input: the gradient in fp32, then the cast's backward to the stream's dtype.
    let wide = saved.own[0].is_some();
    let gb_in = if wide { 4 } else { cx.r };
    let mut gi = cx.alloc(cx.ns * c * gb_in, Temporary, "native_layer_norm_backward");
    let cat = if cx.have_grads { Temporary } else { Grads };
    let trained = !cx.base_frozen();
    let gw = trained.then(|| cx.alloc(c * cx.pb, cat, "native_layer_norm_backward"));
    let gb = (bias && trained).then(|| cx.alloc(c * cx.pb, cat, "native_layer_norm_backward"));
    cx.free(grad_out);
    cx.sim.free_some(&[input]);
    cx.sim.free_some(&saved.stats);
    cx.sim.free_some(&saved.own);
    if wide {
        let narrow = cx.alloc(cx.ns * c * cx.r, Temporary, "_to_copy");
        cx.free(gi);
        gi = narrow;
    }
    let gi = match into {
        Some(acc) => grad_add_into(cx, acc, gi),
        None => gi,
    };
    for g in [gw, gb].into_iter().flatten() {
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
    let (n, c, r) = (cx.ns, cx.m.n_embd, cx.r);
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
    let mut own = [None, None];
    if in_bytes == 2 {
        // A 2-byte input: x.to(float32) is a real copy, made first (`hidden_states.to(torch.float32)`, the line
        // before `pow`; stub-cuda snapshot of llama-lora-fsdp-w8: the 2 MiB copy, then pow's 2 MiB), saved by
        // pow and the multiply.
        own[0] = Some(cx.alloc(wide, Activations, "_to_copy"));
    }
    let pow = cx.alloc(wide, Temporary, "pow");
    let mean = cx.alloc(rows * 4, Temporary, "mean");
    cx.free(pow);
    let added = cx.alloc(rows * 4, Temporary, "add");
    let rstd = cx.alloc(rows * 4, Activations, "rsqrt");
    cx.free(added);
    let normed = cx.alloc(wide, Activations, "mul");
    // `hidden_states = hidden_states * rsqrt(...)` rebinds the fp32 copy: unsaved (a checkpointed forward, or
    // a first block whose input needs no gradient), it dies here, before the cast back (stub-cuda snapshot of
    // llama-lora-r16-all-bf16amp, block 0).
    if !cx.saving {
        if let Some(copy) = own[0].take() {
            cx.free(copy);
        }
    }
    let out = if in_bytes == 2 {
        // normed.to(2 bytes) is saved by the weight multiply; the fp32 normed dies with the cast.
        // The fp32 normed is the function's local until it returns, after the multiply (stub-cuda snapshot of
        // llama-sdpa-2048-gqa-v2k-ckpt-bf16).
        let lp = cx.alloc(rows * width * 2, Activations, "_to_copy");
        let o = cx.alloc(rows * width * in_bytes.max(cx.pb), Activations, "mul");
        // A frozen weight (LoRA's base) needs no gradient: the multiply saves only the weight, and the cast dies
        // with the expression (stub-cuda snapshot of llama-lora-r16-all-bf16amp: only the fp32 copy and rsqrt
        // live at the peak).
        if cx.base_frozen() {
            cx.free(lp);
        } else {
            own[1] = Some(lp);
        }
        // The fp32 normed is the function's local until it returns (stub-cuda snapshot of
        // llama-sdpa-2048-gqa-v2k-ckpt-bf16: freed after the multiply).
        cx.free(normed);
        o
    } else {
        let o = cx.alloc(wide, Activations, "mul");
        if cx.base_frozen() {
            cx.free(normed);
        } else {
            own[1] = Some(normed);
        }
        o
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
            lp_product: in_bytes == 2 && cx.pb == 2,
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
    let (n, c) = (cx.ns, cx.m.n_embd);
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
    // A frozen weight (LoRA's base): the product saves only the scale, so the normalised x dies.
    let normed = if cx.base_frozen() {
        cx.free(normed);
        None
    } else {
        Some(normed)
    };
    for t in [copy, normed, Some(rstd), scale].into_iter().flatten() {
        cx.drop_unsaved(t);
    }
    (
        out,
        NormSaved {
            stats: [Some(rstd), scale],
            own: [copy, normed],
            lp_product: false,
        },
    )
}

/// Backward of `rms_norm_fwd` (the residual stream's norm): see `rms_norm_bwd_on`.
pub fn rms_norm_bwd(cx: &mut Ctx, grad_out: Tensor, saved: NormSaved, input: Tensor) -> Tensor {
    let (n, c, r) = (cx.ns, cx.m.n_embd, cx.r);
    rms_norm_bwd_on(
        cx,
        grad_out,
        saved,
        Some(input),
        (n, c, r),
        InputBuffer::default(),
    )
}

/// Backward of `rms_norm_fwd_on` as autograd runs it (`input`: the norm's input when it saved it itself): the weight multiply (grad of normed and of weight, a
/// `sum` to [width]), the `x * rsqrt` multiply, rsqrt's and mean's backward (rows x width fp32 temporaries), and
/// the gradients summed into one fp32 gradient of the input, cast back to a 2-byte input's dtype, in the input's
/// `buffer`.
pub fn rms_norm_bwd_on(
    cx: &mut Ctx,
    grad_out: Tensor,
    saved: NormSaved,
    input: Option<Tensor>,
    (rows, width, in_bytes): (u64, u64, u64),
    buffer: InputBuffer,
) -> Tensor {
    rms_norm_bwd_from(
        cx,
        (grad_out, true),
        saved,
        input,
        (rows, width, in_bytes),
        false,
        buffer,
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
    rms_norm_bwd_from(
        cx,
        (grad_out, release_grad_out),
        saved,
        input,
        dims,
        false,
        InputBuffer::default(),
    )
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
    let buffer = InputBuffer::default();
    rms_norm_bwd_from(cx, (g, release), saved, input, dims, bf16_weight, buffer)
}

/// Resident threads per SM at compute capability `sm` (the CUDA programming guide's table of compute
/// capabilities: 1536 on sm_86, sm_87 and sm_89, 1024 on sm_75, 2048 on the others here).
fn threads_per_sm(sm: u32) -> u64 {
    match sm {
        86 | 87 | 89 | 120 => 1536,
        75 => 1024,
        _ => 2048,
    }
}

/// The global-memory scratch of PyTorch's CUDA reduction kernel (`gpu_reduce_kernel`,
/// aten/src/ATen/native/cuda/Reduce.cuh, torch 2.15) when it sums a contiguous `rows` x `width` tensor over its
/// rows into `width` outputs (a broadcast weight's gradient reduced by autograd's `sum_to`): `(buffer,
/// semaphores)` bytes, allocated after the output and freed when the kernel returns (semaphores first), or `None`
/// when one block reduces each output. The launch configuration `setReduceConfig` picks, restated: the outputs
/// are the fastest dimension, so each thread reads `vec` adjacent outputs (4, 2 or 1: the largest dividing
/// `width`); a block is `bw` lanes over outputs by `bh` warps over rows (powers of two, at most 512 / vec threads,
/// `bw` at most 32); the rows are split across the warps when each then still sums at least min(16 bh, 256) of
/// them; and across `ctas` blocks, through the global buffer, when each warp would sum at least 256 rows and the
/// output blocks `gx` do not fill the GPU: ctas = clamp(ceil(target / gx), ceil(v / 256), ceil(v / 16)) with v
/// the rows per warp and target = SMs x (threads per SM / threads per block). The buffer holds one fp32 partial
/// per output, block and lane (4 width ctas bw vec bytes), the semaphores one int per output block. `sms`: the
/// device's SMs (`DeviceConfig::sms`), `sm`: its compute capability.
/// (stub-cuda snapshot of mixtral-256-v1k-e8top4-i1024-bf16amp: the final norm's weight gradient, 2048 x 256
/// fp32 on sm_90, takes 4 MiB and 8 B.)
pub fn column_sum_scratch(rows: u64, width: u64, sms: u64, sm: u32) -> Option<(u64, u64)> {
    // Nothing to reduce (an empty tensor launches no kernel).
    if rows == 0 || width == 0 {
        return None;
    }
    let threads_per_sm = threads_per_sm(sm);
    let floor_pow2 = |x: u64| {
        if x <= 1 {
            1
        } else {
            1u64 << (63 - x.leading_zeros())
        }
    };
    let vec = [4, 2, 1]
        .into_iter()
        .find(|v| width.is_multiple_of(*v))
        .unwrap_or(1);
    let max_threads = 512 / vec;
    let cap = |d: u64| {
        if d < max_threads {
            floor_pow2(d)
        } else {
            max_threads
        }
    };
    let (d0, d1) = (cap(width / vec), cap(rows));
    let bh = d1.min(max_threads / d0.min(32));
    let bw = d0.min(max_threads / bh);
    let split_warps = rows >= (bh * 16).min(256);
    if !split_warps {
        return None;
    }
    let per_warp = rows.div_ceil(bh);
    let gx = (width / vec).div_ceil(bw);
    let target = sms * (threads_per_sm / (bw * bh));
    if per_warp < 256 || gx > target {
        return None;
    }
    let ctas = target
        .div_ceil(gx)
        .clamp(per_warp.div_ceil(256), per_warp.div_ceil(16));
    (ctas > 1).then_some((4 * width * ctas * bw * vec, 4 * gx))
}

fn rms_norm_bwd_from(
    cx: &mut Ctx,
    (grad_out, release_grad_out): (Tensor, bool),
    saved: NormSaved,
    input: Option<Tensor>,
    (rows, width, in_bytes): (u64, u64, u64),
    olmo2_bf16: bool,
    buffer: InputBuffer,
) -> Tensor {
    let wide = rows * width * 4;
    // weight * normed: grad of normed (mul) and of weight (mul, then sum to [width]), in the product's dtype; a
    // frozen weight (LoRA's base) gets none.
    let product = if saved.lp_product {
        rows * width * 2
    } else {
        wide
    };
    let g_normed = cx.alloc(product, Temporary, "mul");
    let gw = (!cx.base_frozen()).then(|| {
        let g_w_full = cx.alloc(product, Temporary, "mul");
        if olmo2_bf16 {
            cx.sim.scratch(2 * wide, Temporary, "sum");
        }
        let cat = if cx.have_grads { Temporary } else { Grads };
        let gw = cx.alloc(width * cx.pb, cat, "sum");
        if !olmo2_bf16 {
            if let Some((buffer, semaphores)) =
                column_sum_scratch(rows, width, u64::from(cx.sms), cx.sm)
            {
                let b = cx.alloc(buffer, Temporary, "sum");
                let s = cx.alloc(semaphores, Temporary, "sum");
                cx.sim.free_all(&[s, b]);
            }
        }
        cx.free(g_w_full);
        gw
    });
    if release_grad_out {
        cx.free(grad_out);
    }
    // The weight multiply's saved normalised x goes with its node; the fp32 copy of a 2-byte input lives on
    // until `pow`'s backward (stub-cuda snapshot of llama-small-bf16-sgd).
    let [copy, normed] = saved.own;
    cx.sim.free_some(&[normed]);
    let g_normed = if saved.lp_product {
        // The cast down's backward (`ToCopyBackward0`): the 2-byte gradient back to fp32.
        let g = cx.alloc(wide, Temporary, "_to_copy");
        cx.free(g_normed);
        g
    } else {
        g_normed
    };
    // x * rsqrt: grad of rsqrt (mul, summed to [rows]) and of x (mul).
    let g_rstd_full = cx.alloc(wide, Temporary, "mul");
    let g_x1 = cx.alloc(wide, Temporary, "mul");
    cx.free(g_rstd_full);
    cx.free(g_normed);
    // An fp32 input (`x.to(float32)` returns x itself) has both paths' gradients go straight to x's buffer: into
    // a residual gradient it already holds, each is added in place as it arrives (the first here, before
    // rsqrt's backward runs; stub-cuda snapshots of llama-tiny-fp32-mha and llama-tiny-bf16amp-gqa).
    let absorbed = match buffer.holds {
        Some(acc) if in_bytes != 2 && !buffer.dtensor => Some(grad_add_into(cx, acc, g_x1)),
        _ => None,
    };
    cx.sim.free_some(&saved.stats);
    // rsqrt -> mean (expand / width) -> pow(2) (2 x x): three rows x width fp32 temporaries alive together.
    let g_div = cx.alloc(wide, Temporary, "div");
    let g_pow = cx.alloc(wide, Temporary, "pow");
    let g_mul = cx.alloc(wide, Temporary, "mul");
    let g_x2 = cx.alloc(wide, Temporary, "mul");
    cx.free(g_mul);
    cx.free(g_pow);
    cx.free(g_div);
    cx.sim.free_some(&[input, copy]);
    let push_weight_grad = |cx: &mut Ctx| {
        if let Some(gw) = gw {
            if cx.have_grads {
                cx.free(gw);
            } else {
                cx.grads.push(gw);
            }
        }
    };
    if let Some(acc) = absorbed {
        let acc = grad_add_into(cx, acc, g_x2);
        push_weight_grad(cx);
        return acc;
    }
    // The two paths into x meet in one buffer (x's own, or for a 2-byte input the buffer of `x.to(float32)`'s
    // backward), which holds the first, a fresh product, alone: the second is added into it in place (stub-cuda
    // snapshots of llama-small-bf16-sgd, the final norm of llama-tiny-fp32-mha, olmo2-768-tied-bf16), unless
    // the norm runs on DTensors.
    let gi = if buffer.dtensor {
        grad_sum(cx, g_x1, g_x2, wide)
    } else {
        grad_add_into(cx, g_x1, g_x2)
    };
    push_weight_grad(cx);
    let gi = if in_bytes == 2 {
        // `x.to(float32)`'s backward casts the fp32 sum back; the cast is what reaches the input's buffer.
        let lp = cx.alloc(rows * width * 2, Temporary, "_to_copy");
        cx.free(gi);
        lp
    } else {
        gi
    };
    match buffer.holds {
        Some(acc) => grad_add_into(cx, acc, gi),
        None => gi,
    }
}

/// `nn.Dropout(p)` in training on CUDA with 0 < p < 1: `native_dropout` returns the output (input dtype) and a
/// bool mask (1 byte per element), and saves the mask. The CUDA kernel allocates the mask first (stub-cuda
/// snapshot of llama-lora-r16-all-bf16amp: each adapter's N x in_f bool mask, then its fp32 output).
pub fn dropout_fwd(cx: &mut Ctx, elems: u64, bytes: u64, category: Category) -> (Tensor, Tensor) {
    let mask = cx.alloc(elems, Activations, "native_dropout");
    let out = cx.alloc(elems * bytes, category, "native_dropout");
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
    let accum = match backend {
        SdpaBackend::Flash => flash_splitkv(cx, op),
        SdpaBackend::Efficient => None,
    };
    let rng = [cx.alloc(8, Activations, op), cx.alloc(8, Activations, op)];
    for t in accum.into_iter().flatten() {
        cx.sim.free(t);
    }
    for t in [lse, rng[0], rng[1]] {
        cx.drop_unsaved(t);
    }
    SdpaSaved { out, lse, rng }
}

/// Flash attention's split-KV accumulators (`set_params_splitkv`, called by `mha_fwd` right after it allocates
/// `softmax_lse`, in PyTorch's aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp and in flash-attn
/// 2.8's csrc/flash_attn/flash_api.cpp alike). Without dropout, when the forward's grid of B x H x ceil(T / 64)
/// row blocks would leave the GPU underused, the keys are split into `flash_num_splits` parts that write partial
/// results in fp32: `softmax_lse_accum` [splits, B, H, T] and `out_accum` [splits, B, H, T, head size rounded up
/// to 32 (64 above 128)]. They are locals of `mha_fwd`, freed when it returns (after its RNG-state tensors): the
/// caller frees the returned pair there. `None` when the keys are not split.
pub fn flash_splitkv(cx: &mut Ctx, op: &'static str) -> Option<[Tensor; 2]> {
    if cx.dropout {
        return None; // "SplitKV is not implemented for dropout"
    }
    let (b, h, t) = (cx.b, cx.m.n_head, cx.t);
    let hs = cx.m.head_dim().next_multiple_of(8);
    // The key block of the split kernels (`run_mha_fwd_splitkv_dispatch`): 256 keys for heads up to 64 wide,
    // 128 up to 128, else 64.
    let block_n = match hs {
        0..=64 => 256,
        65..=128 => 128,
        _ => 64,
    };
    let splits = flash_num_splits(
        b * h * t.div_ceil(64),
        u64::from(cx.sms),
        t.div_ceil(block_n),
    );
    if splits <= 1 {
        return None;
    }
    let hs_rounded = hs.next_multiple_of(if hs <= 128 { 32 } else { 64 });
    let lse_accum = cx.alloc(splits * b * h * t * 4, Workspace, op);
    let out_accum = cx.alloc(splits * b * h * t * hs_rounded * 4, Workspace, op);
    Some([lse_accum, out_accum])
}

/// `num_splits_heuristic` of flash_api.cpp for `rows` = B x H x row blocks on a GPU of `sms` SMs (the kernels run
/// 128-thread blocks, two per SM: the heuristic is given 2 x the SM count) with `n_blocks` key blocks: one split
/// when the rows nearly fill the SMs (at least 0.8 x 2 x SMs); else, over the split counts up to 128, the SMs and
/// the key blocks (skipping counts that leave the blocks per split unchanged), the efficiency of each is its waves
/// over the waves rounded up, and the smallest count within 85% of the best is chosen. In single precision as the
/// C++ computes it.
pub fn flash_num_splits(rows: u64, sms: u64, n_blocks: u64) -> u64 {
    let slots = 2 * sms;
    if rows as f32 >= 0.8f32 * slots as f32 {
        return 1;
    }
    let max_splits = 128.min(slots).min(n_blocks);
    let eligible = |s: u64| s == 1 || n_blocks.div_ceil(s) != n_blocks.div_ceil(s - 1);
    let efficiency = |s: u64| {
        let waves = (rows * s) as f32 / slots as f32;
        waves / waves.ceil()
    };
    let best = (1..=max_splits)
        .filter(|&s| eligible(s))
        .map(efficiency)
        .fold(0f32, f32::max);
    (1..=max_splits)
        .find(|&s| eligible(s) && f64::from(efficiency(s)) >= 0.85 * f64::from(best))
        .unwrap_or(1)
}

/// Attention backward. Kernel scratch first (FlashAttention-2 `mha_bwd`: `dq_accum` fp32
/// [B, round128(T), H, round32(hs)] and `softmax_d` fp32 [B, H, round128(T)]; memory-efficient: `delta` fp32
/// [B, H, T], plus an fp32 grad-q accumulator [B, T, H, hs] for 2-byte inputs), then dq (n x C) and dk, dv
/// (n x kv_dim) in matmul dtype. Returns (dq, dk, dv).
///
/// Not PyTorch's order for flash: its memory snapshots (`nanogpt-30m-b1`, eager, and
/// `tiny-vocab-grads-amp-compiled`, tests/data/stub-cuda/snapshots/) show dq, dk and dv first, then `softmax_d`,
/// then `dq_accum`, the two freed after the kernel, so all five are live at once. Taken that way (two buffers
/// after the outputs) three stub-cuda reserved figures become exact (`gpt2-124m-block1024` and its expandable run
/// -0.01% -> 0, `mixtral-256-e4top2-bf16amp-compiled` -0.92% -> 0), one moves away
/// (`gpt2-124m-block1024-compiled` +1.41% -> +1.44%), and in a compiled graph the two must stay out of
/// Inductor's reuse plan (ATen allocates them, the wrapper never sees them). As one scratch after the outputs,
/// `shakespeare-char-ckpt-compiled`'s allocated moves from -1.93% to +0.98% of the stub's and +2.74% above its
/// fake-cuda record, whose tracker (`measure.py`, `before_kernel`) also takes the scratch first. Not changed yet.
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

/// What the flash-attn package's `FlashAttnFunc` saves besides its inputs (HF's `flash_attention_2`).
pub struct FlashSaved {
    pub out: Tensor,
    pub lse: Tensor,
    pub rng: Tensor,
}

impl FlashSaved {
    /// Every tensor it holds (output, logsumexp, RNG state), for releasing them together.
    pub fn tensors(&self) -> [Tensor; 3] {
        [self.out, self.lse, self.rng]
    }
}

/// flash-attn 2.8's forward (`FlashAttnFunc.forward` -> `flash_attn_2_cuda.fwd`, csrc/flash_attn/flash_api.cpp
/// `mha_fwd`) on q, k, v as [B, T, heads, hs] with hs a multiple of 8 (no padding in Python): `out =
/// torch::empty_like(q)` (n x q_dim in q's dtype), `softmax_lse` fp32 [B, H, T], `p` empty (no dropout softmax
/// returned), the split-KV accumulators of a small grid (`flash_splitkv`, freed at return), `rng_state` int64 [2]
/// (16 B). `ctx.save_for_backward(q, k, v, out_padded, softmax_lse, rng_state)`.
pub fn flash_attn_fwd(cx: &mut Ctx) -> FlashSaved {
    let op = "flash_attn::_flash_attn_forward";
    let out = cx.alloc(cx.n * cx.m.q_dim() * cx.p, Activations, op);
    let lse = cx.alloc(cx.b * cx.m.n_head * cx.t * 4, Activations, op);
    let accum = flash_splitkv(cx, op);
    let rng = cx.alloc(2 * 8, Activations, op);
    for t in accum.into_iter().flatten() {
        cx.sim.free(t);
    }
    for t in [lse, rng] {
        cx.drop_unsaved(t);
    }
    FlashSaved { out, lse, rng }
}

/// flash-attn 2.8's backward (`FlashAttnFunc.backward` -> `flash_attn_2_cuda.bwd`, flash_api.cpp `mha_bwd`):
/// Python allocates dq, dk, dv (`torch.empty_like` of q, k, v: n x q_dim, n x kv_dim, n x kv_dim in the inputs'
/// dtype) before the call; mha_bwd then allocates `softmax_d` fp32 [B, H, round128(T)] (returned, dropped by
/// Python when the op returns), `dq_accum` fp32 [B, round128(T), H, round(hs, 32; 64 above 128)], and for grouped
/// or multi-query heads `dk_expanded`, `dv_expanded` [B, T, H, hs] in the inputs' dtype, summed into dk, dv over
/// each group; its locals die at return. Returns (dq, dk, dv).
pub fn flash_attn_bwd(cx: &mut Ctx) -> (Tensor, Tensor, Tensor) {
    let (b, t, h, hs) = (cx.b, cx.t, cx.m.n_head, cx.m.head_dim());
    let (qd, kv, p) = (cx.m.q_dim(), cx.m.kv_dim(), cx.p);
    let op = "flash_attn::_flash_attn_backward";
    let dq = cx.alloc(cx.n * qd * p, Temporary, "empty_like");
    let dk = cx.alloc(cx.n * kv * p, Temporary, "empty_like");
    let dv = cx.alloc(cx.n * kv * p, Temporary, "empty_like");
    let t128 = t.div_ceil(128) * 128;
    let hs_rounded = hs.next_multiple_of(if hs <= 128 { 32 } else { 64 });
    let softmax_d = cx.alloc(b * h * t128 * 4, Workspace, op);
    let dq_accum = cx.alloc(b * t128 * h * hs_rounded * 4, Workspace, op);
    let expanded = (kv != qd).then(|| {
        [
            cx.alloc(b * t * h * hs * p, Workspace, op),
            cx.alloc(b * t * h * hs * p, Workspace, op),
        ]
    });
    if let Some([dk_e, dv_e]) = expanded {
        cx.sim.free_all(&[dv_e, dk_e]);
    }
    cx.sim.free_all(&[dq_accum, softmax_d]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::AllocatorConfig;

    /// HF's `LlamaRMSNorm` on a bf16 stream [4, 256, 512] (stub-cuda snapshot of llama-lora-fsdp-w8, block 0):
    /// `hidden_states.to(float32)` (2 MiB) comes before `pow` (2 MiB, freed after `mean`). Saving (a block whose
    /// input needs a gradient), the copy and rsqrt stay; not saving (block 0 of a LoRA model: nothing upstream
    /// needs a gradient and the weight is frozen), the forward leaves only its 1 MiB bf16 output.
    #[test]
    fn rms_norm_copies_to_fp32_first_and_saves_nothing_without_grad() {
        let mut setup = crate::presets::model_preset("llama-3.2-1b").unwrap();
        (setup.train.batch_size, setup.train.seq_len) = (4, 256);
        setup.train.precision = Precision::Bf16;
        setup.train.lora = Some(LoraConfig::with_rank(16));
        for saving in [true, false] {
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            sim.record_events();
            let mut cx = Ctx::new(&mut sim, &setup).unwrap();
            cx.saving = saving;
            let (out, _) = rms_norm_fwd_on(&mut cx, 1024, 512, 2);
            let live = cx.sim.live_bytes();
            let out_bytes = cx.sim.bytes_of(out);
            let ops: Vec<&str> = sim.events().iter().take(2).map(|e| e.op).collect();
            assert_eq!(ops, ["_to_copy", "pow"]);
            assert_eq!(sim.events()[0].bytes, 2 << 20);
            assert_eq!(out_bytes, 1 << 20);
            let kept = if saving { (2 << 20) + 4096 } else { 0 };
            assert_eq!(live, out_bytes + kept, "saving {saving}");
        }
    }

    /// Autograd's input buffer on the residual stream (stub-cuda snapshots of llama-tiny-fp32-mha and
    /// llama-tiny-bf16amp-gqa): an fp32 RMSNorm's two input-gradient paths (`x * rsqrt`'s, then `pow`'s) are
    /// added in place into the residual gradient the buffer holds, each freed as it arrives: no N x C `add`, and
    /// after the backward only that gradient and the weight's [C] fp32 gradient (2 KiB) are live. A norm on
    /// DTensors (sequence parallel) sums its two paths out of place first: one N x C `add`, the same end state.
    #[test]
    fn rms_norm_input_gradients_add_into_the_residual_gradient_in_place() {
        let mut setup = crate::presets::model_preset("llama-3.2-1b").unwrap();
        (setup.train.batch_size, setup.train.seq_len) = (4, 256);
        setup.train.precision = Precision::Fp32;
        let (rows, width) = (1024, 512);
        let wide = rows * width * 4;
        for dtensor in [false, true] {
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            sim.record_events();
            let mut cx = Ctx::new(&mut sim, &setup).unwrap();
            let x = cx.alloc(wide, Activations, "residual add");
            let (out, saved) = rms_norm_fwd_on(&mut cx, rows, width, 4);
            cx.free(out);
            let residual = cx.alloc(wide, Temporary, "residual");
            let grad_out = cx.alloc(wide, Temporary, "mm");
            let buffer = InputBuffer {
                holds: Some(residual),
                dtensor,
            };
            let g = rms_norm_bwd_on(&mut cx, grad_out, saved, Some(x), (rows, width, 4), buffer);
            assert_eq!(g, residual);
            assert_eq!(cx.sim.live_bytes(), wide + 2048, "dtensor {dtensor}");
            let adds = sim
                .events()
                .iter()
                .filter(|e| e.op == "add" && e.bytes == wide as i64)
                .count();
            assert_eq!(adds, usize::from(dtensor));
        }
    }

    /// A Linear's backward on Pythia-1B's MLP at batch 4 x 2048 (8192 tokens, fp16 autocast, sm_90), as the
    /// stub-cuda snapshot of preset-pythia-1b-b4-t2048-fp16amp shows each block's `dense_4h_to_h` (8192 -> 2048):
    /// with a bias (`AddmmBackward0`) the input's gradient (8192 x 8192 fp16, 128 MiB) before the weight's
    /// (2048 x 8192 fp16, 32 MiB), then the bias's `sum` (4 KiB) with the reduction's 128 MiB scratch; without
    /// one (`MmBackward0`) the weight's first and no `sum`.
    #[test]
    fn linear_bwd_orders_the_gradients_as_the_node_does() {
        let mut setup = crate::presets::model_preset("pythia-1b").unwrap();
        (setup.train.batch_size, setup.train.seq_len) = (4, 2048);
        setup.train.precision = Precision::Fp16Amp;
        setup.device.sm = 90;
        setup.device.sms = 132;
        for bias in [true, false] {
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            sim.record_events();
            let mut cx = Ctx::new(&mut sim, &setup).unwrap();
            assert_eq!((cx.n, cx.p), (8192, 2));
            let x = cx.alloc(8192 * 8192 * 2, Temporary, "gelu");
            let (y, saved) = linear_fwd(&mut cx, 2, 8192, 2048, bias, Temporary);
            let start = cx.sim.events().len();
            let _ = linear_bwd(&mut cx, y, 2, true, saved, Some(x));
            let allocs: Vec<(&str, i64)> = sim.events()[start..]
                .iter()
                .filter(|e| e.bytes > 0 && (e.op == "mm" || e.op == "sum"))
                .map(|e| (e.op, e.bytes >> 10))
                .collect();
            if bias {
                assert_eq!(
                    allocs,
                    [
                        ("mm", 128 << 10),
                        ("mm", 32 << 10),
                        ("sum", 4),
                        ("sum", 128 << 10),
                        ("sum", 0)
                    ]
                );
            } else {
                assert_eq!(allocs, [("mm", 32 << 10), ("mm", 128 << 10)]);
            }
        }
    }

    /// The CUDA reduction's global scratch, by hand from `setReduceConfig`: 2048 x 256 fp32 on sm_90 (132 SMs,
    /// 2048 threads each): vec 4, a block of 32 x 4 threads, 512 rows per warp, 2 output blocks, target 132 x 16
    /// = 2112 blocks, ctas = clamp(1056, 2, 32) = 32: 4 x 256 x 32 x 32 x 4 = 4 MiB and 2 semaphores, as the
    /// stub-cuda snapshot of mixtral-256-v1k-e8top4-i1024-bf16amp shows. Under 256 rows per warp one block sums
    /// each output (no scratch); at 2048 outputs of 2048 rows, 16 output blocks: ctas = clamp(132, 2, 32) = 32.
    #[test]
    fn column_sum_scratch_follows_the_reduce_config() {
        assert_eq!(column_sum_scratch(2048, 256, 132, 90), Some((4 << 20, 8)));
        assert_eq!(column_sum_scratch(512, 256, 132, 90), None);
        assert_eq!(column_sum_scratch(8192, 0, 132, 90), None);
        // The biases of Pythia-1B's MLP at 8192 tokens (stub-cuda snapshot of preset-pythia-1b-b4-t2048-fp16amp):
        // 2048 outputs, 16 output blocks, ctas = clamp(132, 8, 128) = 128: 128 MiB; 8192 outputs, 64 output
        // blocks, ctas = clamp(33, 8, 128) = 33: 132 MiB.
        assert_eq!(
            column_sum_scratch(8192, 2048, 132, 90),
            Some((128 << 20, 64))
        );
        assert_eq!(
            column_sum_scratch(8192, 8192, 132, 90),
            Some((132 << 20, 256))
        );
        assert_eq!(
            column_sum_scratch(2048, 2048, 132, 90),
            Some((32 << 20, 64))
        );
        // An RTX 4070 (46 SMs x 1536 threads: 12 blocks of 128 each): 2048 x 4096, 32 output blocks, ctas =
        // clamp(ceil(552 / 32) = 18, 2, 32) = 18.
        assert_eq!(
            column_sum_scratch(2048, 4096, 46, 89),
            Some((4 * 4096 * 18 * 32 * 4, 128))
        );
    }

    /// tests/data/finetune/saved-per-linear.json, `frozen-int8`: a `Linear8bitLt` of 512 inputs and 1536 outputs
    /// on a bf16 input [4, 512, 512] that needs a gradient (M = 2048), sm_90. Forward peak above what was live:
    /// A16 2 MiB and the row scales 8 KiB, the int8 input 1 MiB, then (abs and the outlier mask gone) the int32
    /// product 12 MiB, its fp16 dequantization 6 MiB and the bf16 output 6 MiB = 25 MiB + 8 KiB. Backward peak
    /// above what was live: the dequantized weight 1.5 MiB bf16, the input's gradient 2 MiB and cuBLAS's 32 MiB
    /// workspace = 35.5 MiB. The input outlives the op (held, not saved).
    #[test]
    fn linear8bit_matches_the_probe() {
        let mut setup = crate::presets::model_preset("llama-3.2-1b").unwrap();
        (setup.train.batch_size, setup.train.seq_len) = (4, 512);
        setup.train.precision = Precision::Bf16Amp;
        setup.train.lora = Some(LoraConfig::with_rank(16));
        setup.train.quantization = Some(Quantization::Int8);
        setup.device.sm = 90;
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        let mut cx = Ctx::new(&mut sim, &setup).unwrap();
        let n = cx.n;
        assert_eq!(n, 2048);
        let x = cx.alloc(n * 512 * 2, Activations, "x");
        let before = cx.sim.live_bytes();
        let (y, saved) = linear8bit_fwd(&mut cx, (x, 2), (512, 1536, false), Activations, true);
        assert_eq!(cx.sim.peak().bytes - before, 25 * (1 << 20) + 8192);
        assert_eq!(cx.sim.bytes_of(y), 6 << 20);
        assert_eq!(saved.out_bytes, 2);
        cx.free(x);
        assert_eq!(cx.sim.live_bytes(), before + (6 << 20), "x is held");
        let g = cx.alloc(n * 1536 * 2, Temporary, "ones_like");
        let before_bwd = cx.sim.live_bytes();
        let gi = linear8bit_bwd(&mut cx, g, 2, true, saved);
        assert_eq!(cx.sim.peak().bytes - before_bwd, 35 * (1 << 20) + (1 << 19));
        assert_eq!(cx.sim.bytes_of(gi), 2 << 20);
        cx.release_graph_holds();
        assert_eq!(
            cx.sim.live_bytes(),
            (6 << 20) + (2 << 20),
            "y and the input's gradient"
        );
    }

    /// flash_api.cpp's own example (its comment on `num_splits_heuristic`): 48 row blocks on 108 slots (54 SMs)
    /// take 2 splits (efficiency 96 / 108 = 0.89) rather than 3 (0.67), although 9 would fill the waves exactly:
    /// 2 is the smallest within 85% of the best. 211 row blocks on 264 slots: 1 to 4 splits run at 0.80 of their
    /// waves, 5 at 0.999, so 5. A grid of at least 0.8 x the slots (212 >= 211.2), or keys in one block: 1.
    #[test]
    fn num_splits_follows_flash_api() {
        assert_eq!(flash_num_splits(48, 54, 64), 2);
        assert_eq!(flash_num_splits(211, 132, 64), 5);
        assert_eq!(flash_num_splits(212, 132, 64), 1);
        assert_eq!(flash_num_splits(48, 54, 1), 1);
        assert_eq!(
            flash_num_splits(48, 0, 64),
            1,
            "no SMs: never divides by them"
        );
    }

    /// Split-KV on the attention of the stub record gemma-512-hd256-mqa-bf16amp (4 heads of 256, batch 4 x 512,
    /// bf16, an H100's 132 SMs): 4 x 4 x 8 = 128 row blocks against 264 slots, 8 key blocks of 64: 2 splits, so
    /// `softmax_lse_accum` 2 x 4 x 4 x 512 x 4 B = 64 KiB and `out_accum` 2 x 4 x 4 x 512 x 256 x 4 B = 16 MiB
    /// above the output (4 MiB), the logsumexp (32 KiB) and the two RNG tensors (512 B blocks), freed when the op
    /// returns. On 16 SMs (32 slots) the grid fills them: no split. With dropout: never.
    #[test]
    fn flash_forward_splits_the_keys_of_a_small_grid() {
        let peak_above = |sms: u32, dropout: bool| {
            let mut setup = crate::presets::model_preset("gemma-3-1b").unwrap();
            (setup.train.batch_size, setup.train.seq_len) = (4, 512);
            setup.train.precision = Precision::Bf16;
            setup.device.sms = sms;
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            let mut cx = Ctx::new(&mut sim, &setup).unwrap();
            assert_eq!((cx.m.n_head, cx.m.head_dim()), (4, 256));
            assert_eq!(cx.backend, SdpaBackend::Flash);
            cx.dropout = dropout;
            let before = cx.sim.live_bytes();
            let saved = sdpa_fwd(&mut cx);
            let after = cx.sim.live_bytes() - before;
            cx.sim
                .free_all(&[saved.out, saved.lse, saved.rng[0], saved.rng[1]]);
            (cx.sim.peak().bytes - before, after)
        };
        let kept = (4 << 20) + (32 << 10) + 2 * 512;
        assert_eq!(
            peak_above(132, false),
            (kept + (64 << 10) + (16 << 20), kept)
        );
        assert_eq!(peak_above(16, false), (kept, kept));
        assert_eq!(peak_above(132, true), (kept, kept));
    }

    /// flash-attn's forward and backward on Llama-3.2-1B's attention (32 heads of 64, 8 KV heads), batch 2 x
    /// 300 tokens, bf16. Forward: out 2 x 300 x 2048 x 2 B = 2,457,600 B, softmax_lse 2 x 32 x 300 x 4 B =
    /// 76,800 B, rng_state 16 B (each in 512 B blocks). Backward, above what was live: dq 2,457,600 B, dk and dv
    /// 2 x 300 x 512 x 2 B = 614,400 B each, then softmax_d 2 x 32 x 384 x 4 B = 98,304 B, dq_accum 2 x 384 x 32 x
    /// 64 x 4 B = 6,291,456 B and (grouped heads) dk_expanded, dv_expanded 2,457,600 B each: 14,991,360 B at the
    /// peak; afterwards only dq, dk, dv.
    #[test]
    fn flash_attn_allocates_what_flash_api_does() {
        let mut setup = crate::presets::model_preset("llama-3.2-1b").unwrap();
        (setup.train.batch_size, setup.train.seq_len) = (2, 300);
        setup.train.precision = Precision::Bf16;
        setup.train.attention = crate::policy::Attention::FlashAttention2;
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        let mut cx = Ctx::new(&mut sim, &setup).unwrap();
        assert!(cx.arch.flash_attn);
        let f = flash_attn_fwd(&mut cx);
        assert_eq!(cx.sim.bytes_of(f.out), 2_457_600);
        assert_eq!(cx.sim.bytes_of(f.lse), 76_800);
        assert_eq!(cx.sim.live_bytes(), 2_457_600 + 76_800 + 512);
        cx.sim.free_all(&f.tensors());
        let before = cx.sim.live_bytes();
        let (dq, dk, dv) = flash_attn_bwd(&mut cx);
        assert_eq!(
            cx.sim.peak().bytes - before,
            2_457_600 + 2 * 614_400 + 98_304 + 6_291_456 + 2 * 2_457_600
        );
        assert_eq!(cx.sim.live_bytes() - before, 2_457_600 + 2 * 614_400);
        cx.sim.free_all(&[dq, dk, dv]);
    }
}
