//! One micro-step under `torch.compile` (Inductor, PyTorch 2.15) for any model `arch::Arch` describes, as the
//! generated wrapper code allocates and frees its buffers: nanoGPT's GPT and Hugging Face's LlamaForCausalLM
//! are two descriptions walked by the same code (norm, attention layout, MLP, positions, loss).
//!
//! AOTAutograd traces forward and backward into one joint graph and its min-cut partitioner decides what the
//! forward saves; Inductor fuses element-wise chains (GELU, dropout, residual adds, LayerNorm, the loss) into
//! Triton kernels whose intermediates never exist, and the wrapper frees each buffer after its last reader.
//! Everything here was read from allocation traces of `scripts/measure/measure.py` in compile mode
//! (`VRAMFIT_TRACE=file`, sizes chosen so that every shape has a distinct byte count), for autocast fp16/bf16,
//! fp32 and pure bf16, SDPA and manual attention, with and without dropout and bias, and (issue 11) re-read with
//! Inductor's default settings (pattern passes and joint-graph constant folding on) and the whole step tracked,
//! the autograd engine's allocations between the compiled graphs included.
//!
//! The order is the scheduler's own, which Inductor's memory-ordering pass (`reorder`) keeps in most graphs but
//! not all: small ones often run least-peak-memory-first or breadth-first. nanoGPT's backward graph is described
//! kernel by kernel (`Sim::kernel`: what each reads, writes in place or may write over, `described_backward`),
//! and `sim` replays it in the order that pass keeps for it, as read from the graphs Inductor weighed
//! (tests/data/stub-cuda/inductor-graphs/). Other graphs keep the order written here.
//!
//! What the partitioned forward saves, per block (`p` bytes of a matmul output, `r` bytes of the residual):
//! the residual stream before the block and between its branches (`r`: fp32 under autocast, since the adds
//! promote), ln_1's and ln_2's outputs (`p`: the fused LayerNorm kernel writes the matmul dtype directly, so no
//! fp32 norm output and no separate cast exist), the fused QKV output, the attention output with its logsumexp
//! and RNG state, the MLP's fc output and GELU output (`p`), one fp32 per-row statistic per norm, the dropout
//! masks as bool, and, under autocast, every 2-byte weight cast (the backward's matmuls read them). Eager
//! autograd saves the same and more (fp32 norm outputs, their 2-byte casts); the difference is what compile
//! buys in the blocks. The larger gain is the loss: the LM head's backward is one fused kernel that computes
//! softmax - one_hot from the saved fp16 logits and two per-row statistics, so no log-softmax and no fp32 copy
//! of the logits are ever saved, and (pattern passes on) it writes that gradient in the matmul dtype. What it
//! costs is outside the graphs: the logits are a differentiable output of the compiled forward whose gradient
//! nobody uses, so the autograd engine hands the compiled backward a zeros tensor of their shape (see
//! `head_backward`). At the start of the backward, then, compile holds three logit-sized buffers of the matmul
//! dtype (the logits, those zeros and the loss gradient) where eager holds 12 bytes per logit.
//!
//! For HF Llama (autocast, fp32, pure bf16; untied and tied head) the partitioned forward saves per layer the
//! layer input and the stream after attention (`r` bytes; the first layer under autocast keeps a `p`-byte buffer
//! there instead), input_layernorm's output, the rotated q, the attention output (`p`), the rotated k and v (kv
//! width, `p`), post_attention_layernorm's output (`p`), the gate and up outputs and their SiLU product
//! (intermediate width, `p`), one fp32 row statistic per norm, the logsumexp and RNG state, and under autocast
//! every weight cast. After the last layer: its output (`r`), the final norm's output (`p`), then the fused loss
//! as in nanoGPT (`p`-byte logits and two row statistics; the shifted labels). HF's loss upcasts the logits
//! (`logits.float()`), but the fused loss backward writes its gradient in the logits' dtype all the same.
//!
//! Gemma's layers (its RMSNorm, GeGLU, multi-query attention with 256-wide heads) save Llama's buffers; its scaled
//! embeddings are a new fp32 tensor, and the first layer then saves the fp32 stream after attention as the others
//! do (`gemma-512-hd256-mqa-bf16amp-compiled`).
//!
//! With q/k norms (Qwen 3's RMSNorm over each head of q and k before rotary) the forward saves, besides, the q and
//! k projections and one fp32 statistic per head and token for each, and the backward runs each norm's backward in
//! rotary's kernel, with an fp32 buffer of the projection's width for the norm weight's gradient
//! (`qwen3-512-hd128-tied-bf16amp-compiled`).
//!
//! Norms after the branches (Gemma 3's, besides the ones before them) keep each branch's output and a row
//! statistic (`post_norm_fwd`: `gemma3-512-hd256-win256-bf16amp-compiled`, with q/k norms, scaled embeddings
//! and the sliding window).
//!
//! Without norms before the branches (OLMo 2's: post-norms only, q/k norms over the whole projection) the
//! branches' matmuls read the stream, and under autocast the forward saves its 2-byte cast rather than the fp32
//! stream (`olmo2-512-untied-bf16amp-compiled`). Checkpointed, it is refused (not traced).
//!
//! A sliding window the sequence reaches (Mistral's) sends the sliding layers through an explicit mask: one
//! additive [B, 1, T, T] mask per forward, memory-efficient attention, k (and v, where KV heads are shared) saved
//! repeated to every head, v's gradient summed back (`mistral-512-win128-bf16amp-compiled`).
//!
//! Phi-3's packed projections are saved whole (q/k/v: SDPA reads v as a view of it; gate/up), each with one weight
//! cast, and their backward writes one packed gradient for one Linear backward; rotary on part of each head stays
//! inside the rotary kernel (`phi3-512-untied-bf16amp-compiled`).
//!
//! GPT-NeoX's layers (parallel branches, q/k/v packed per head, partial rotary, biases) save the packed q/k/v
//! output whole, the rotated q and k, SDPA's tensors and a contiguous token-order copy of its output, both norm
//! outputs with one shared pair of row statistics, fc's and GELU's outputs, and no stream between the branches;
//! both branches' backward read one 2-byte copy of the residual gradient (`neox_block_fwd`, `neox_block_bwd`:
//! the stub-cuda re-run of `neox-512-bf16amp-compiled`, its wrappers and memory snapshot; traced under autocast
//! without checkpointing, the rest refused).
//!
//! Mixtures of experts (Mixtral, Qwen2-MoE, OLMoE) under bf16-amp run their experts through transformers' custom
//! op `transformers::grouped_mm_fallback` (Dynamo takes it whenever the expert weights are not bf16), opaque to
//! Inductor: one `torch.zeros` output, one GEMM per expert with tokens. Per layer the partitioned forward saves
//! the router's logits (Mixtral; the backward recomputes the softmax) or its fp32 softmax (the others), the top-k
//! values (with a renormalisation) and ids, the sort's permutation, each pair's token and the inverse permutation,
//! the pairs' inputs gathered in fp32 [S, C], the offsets, the experts' fp32 outputs (gate_up [S, 2I], the SiLU
//! product [S, I], down [S, C]) and the pairs' scores; the scatter back is fused with the residual add and the
//! next norm, so no [S, C] or [N, C] buffer of it exists. Its backward reads the fp32 residual gradient itself
//! (no 2-byte copy is made for it), and the custom op's backward allocates the input's gradient and the dense fp32
//! weight gradient (`moe_fwd`, `moe_bwd`; Qwen2-MoE's shared expert is Llama's SwiGLU, its output saved for the
//! gate). Read from the wrappers and memory snapshots of the stub-cuda re-runs of
//! `mixtral-256-e4top2-bf16amp-compiled`, `qwen2moe-256-e8top2-shared-gqa-bf16amp-compiled` and
//! `olmoe-256-e8top2-bf16amp-compiled`. Routing: those records force balanced routing (pair p to expert p mod E,
//! `measure.py` `patch_moe_routing`), which makes the sort and the offsets the same in every layer, and Inductor
//! computes them once; the model computes them per layer, as real routing does (a few int64 [S] buffers: the
//! 55 KiB, +0.03%, each record is estimated above PyTorch's allocator on the stub, whose reserved it puts 0.8-0.9%
//! below). The expert buffers are [S, ...] and the weight gradients dense whatever the routing, so only the
//! per-expert GEMMs' cuBLAS workspace (taken once per op in the model; on the stub every GEMM runs, its offsets
//! answered as a GPU holds them, and no figure moved for it: tests/data/stub-cuda/README.md) depends on it. Other precisions, checkpointing and the auxiliary loss are refused (not traced).
//!
//! Hugging Face's eager attention (`attn_implementation="eager"`, train.attention "manual") on separate q/k/v
//! projections saves, besides rotated q, k and v repeated to every head, the T x T probabilities in the matmul
//! dtype and either the fp32 probabilities or the raw scores with two row statistics (`EagerSaved`: the first
//! layer the statistics, every later one the fp32 probabilities, in both wrappers read), and the attention
//! output's contiguous transpose (`llama-manual-512-gqa-bf16amp-compiled`). Gemma 2 adds soft-capped scores (the
//! raw scores saved in every layer) and soft-capped logits (a second logit-sized buffer, `head_forward`); its
//! sliding window is applied inside the softmax kernel, no mask tensor
//! (`gemma2-512-hd256-win256-bf16amp-compiled`). Both estimate the fake-cuda replay of their wrappers to the
//! MiB shown. With q/k norms, packed projections or activation checkpointing it is refused (not traced).
//!
//! Each of these six records (issue 12) is estimated 3-4 KiB below the peak of the fake-cuda replay of its
//! wrapper (`measure.py` in compile mode; a few 512-byte blocks), and within 1.4% allocated and 1.2% reserved of
//! PyTorch's own allocator on the stub (`hf.json`; the replay itself is 0.2-1.4% below those peaks).
//!
//! Every GEMM takes its cuBLAS workspace when it runs and returns it after (`mm`), as in eager mode.
//!
//! With activation checkpointing (nanoGPT's `torch.utils.checkpoint(block, x, use_reentrant=False)` per block,
//! HF's `gradient_checkpointing_enable(use_reentrant=False)`) the partitioner saves only each block's input
//! (`Saved::Input`); the last block's output is not saved either, and the final norm keeps two row statistics.
//! The backward graph recomputes each block right before its backward, the last one between the head's matmuls
//! and the final norm's backward (`block_recompute`, `head_backward`); recomputed residual dropouts keep fp32
//! random values. Read from `VRAMFIT_TRACE` traces of 2-layer variants (64 and 96 wide, vocab 1000: nanoGPT
//! fp16-amp with and without dropout, pure bf16; Llama bf16-amp and pure bf16) and, for the dropout buffers, of
//! `shakespeare-char-ckpt-compiled`.
//!
//! The backward follows the wrapper's order and in-place writes, checked with PyTorch's own allocator on the stub
//! (tests/data/stub-cuda/): each Linear's weight-gradient GEMM, input-gradient GEMM, then the conversion of the
//! weight gradient (`linear_bwd`); the residual gradient written over itself by every norm's backward (over the
//! last block's saved output by a final RMSNorm's), SwiGLU's up-projection gradient over the saved up output,
//! and each of Llama's q, k and v projections with its own input gradient (wrappers of
//! `llama-3.2-1b-like-b1-compiled`, `qwen-like-tied-152k-compiled`, the founding case and the bias cases). The
//! caching allocator, replayed, is only as right as this order: with each residual gradient new and each
//! conversion before the input gradient it reserved 5% too much on the first of those cases and 5% too little on
//! the second. A checkpointed Llama block's first run, whose tensors die with it, makes two buffers fewer
//! (`separate_attn_fwd`, `mlp_fwd`).
//!
//! A branch's last GEMM output (o_proj's, down_proj's) is read last by the residual add, which Inductor fuses
//! with the next norm: it dies once that norm's outputs exist (`Sim::free_after_next_kernel`; wrapper of
//! `qwen-like-tied-152k-compiled`: down_proj's output is freed after the next input_layernorm's, which cannot take
//! its block).
//!
//! Where the wrapper hands a dead buffer to a new one of the same dtype and size (`bufM = bufN  # reuse`, its memory
//! planning) the dead buffer stays allocated until then: the model replays that rule (`Sim::begin_graph`, with
//! each buffer's dtype width and the extern kernels marked here; `INDUCTOR_BUFFER_REUSE`, measured there).
//!
//! Checkpointed nanoGPT blocks (`gelu_block`) follow the wrappers of `shakespeare-char-ckpt-compiled` (issue 10;
//! fp16-amp with dropout, its memory snapshot) and `gpt-8x512-ckpt-bf16-accum2-compiled` (pure bf16): the first run
//! frees each buffer after its last reader and keeps one stream buffer per block (`gelu_block_discarded`); the
//! backward runs each block again interleaved with its own MLP backward, GELU's output made after c_proj's input
//! gradient (`gelu_block_backward`), the last block whole with c_proj's output (`gelu_block_recompute_last`).
//! With the reuse replayed, the caching allocator then needs a new 48 MiB segment for a recomputed GELU output in
//! step 3, as PyTorch's does (steps 1 to 3: 666, 692, 740 MiB reserved modelled, 650, 678, 758 measured).
//!
//! What it does not follow is the rest of Inductor's scheduler: for Llama a checkpointed backward runs the
//! attention's weight gradients after all its input gradients (`llama-ckpt-fp16amp-accum2`), where the model keeps
//! the order above; Inductor's `reorder_for_peak_memory` keeps a topological sort of the backward whose estimated
//! peak is lower than its own order's (LPMF for `tiny-vocab-grads-amp`, the conversions last; BFS for
//! `grads-dominate-accum3-fp16` and `wide-2048-fp32-bias`; the 14 other compiled records logged keep their own:
//! tests/data/stub-cuda/README.md); a GELU MLP's output projection gets no buffer of its own (the wrapper's lives
//! while the next norm kernels recompute the stream; without dropout the model keeps each attention projection's
//! output to the forward's end instead, `fused_attn_fwd`); and the reuse's estimated-peak check reads the model's
//! live bytes, where Inductor's `estimate_peak_memory` also counts a kernel's output written in place over its
//! dying input as a buffer of its own, and buffers its kernels later fuse away (logged from its planner on
//! `shakespeare-char-ckpt-compiled`: the backward's estimated peak, 507,501,856 B, is at block 4's GELU backward,
//! where the gradient written over c_proj's input gradient counts beside it; each ln_1 backward counts a 24 MiB
//! fp32 buffer the wrapper never allocates). Of the 48 MiB buffers the wrapper hands on there (fc's and GELU's
//! outputs and gradients), the model's check refuses two Inductor's accepts (the forward's fc output of block 4,
//! `buf131 = buf106  # reuse`, and one of block 2 in the backward) and agrees on the rest, refusals included.
//! Checked against the compiled configs in `tests/data/compiled/` and `tests/data/stub-cuda/` (docs/ACCURACY.md).

use crate::arch::{Core, Mlp, Norm, Positions, Program, Qkv};
use crate::policy::SdpaBackend;
use crate::sim::Category::{self, Activations, Grads, Logits, Temporary, WeightCopies};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, SdpaSaved};

/// Vocabulary columns of the B x T x vocab buffers. Inductor pads some of them to 16-element rows when the
/// vocabulary is not a multiple of 16, and which depends on its layout choices (measured: V = 65 pads the fp16
/// logits to 80 columns, V = 50257 pads the fp32 loss gradient to 50272, V = 1000 pads none). The model pads all
/// three, an upper bound of 15 columns per row that stays under 0.1% of the peak in every measured config.
fn padded_vocab(v: u64) -> u64 {
    v.div_ceil(16) * 16
}

/// An extern kernel that allocates its own outputs (a fallback op: SDPA's flash and memory-efficient kernels,
/// transformers' `grouped_mm_fallback`): the wrapper has no `AllocateLine` for them, so its memory planning never
/// hands them a dead buffer (`Sim::set_extern`).
fn extern_kernel<T>(cx: &mut Ctx, f: impl FnOnce(&mut Ctx) -> T) -> T {
    cx.sim.set_extern(true);
    let out = f(cx);
    cx.sim.set_extern(false);
    out
}

/// A buffer of `width`-byte elements (its dtype, as Inductor's reuse key has it: fp16 and bf16 never meet in one
/// graph), `bytes` in all.
fn alloc_as(cx: &mut Ctx, bytes: u64, width: u64, cat: Category, op: &'static str) -> Tensor {
    cx.sim.alloc_typed(bytes, width, cat, op)
}

/// A GEMM's output (an `extern_kernels.mm`/`bmm`/`addmm` buffer of the wrapper), then the cuBLAS workspace the GEMM
/// takes and returns while it runs (`Ctx::matmul_workspace`).
fn mm(cx: &mut Ctx, bytes: u64, width: u64, cat: Category, op: &'static str) -> Tensor {
    let t = alloc_as(cx, bytes, width, cat, op);
    cx.matmul_workspace();
    t
}

/// A Linear's forward GEMM: its output, then the workspace the GEMM takes. With a bias Inductor calls `addmm` with
/// the 1-D bias, which runs through cuBLASLt and takes its 1 MiB workspace (`ops::CUBLASLT_WORKSPACE_BYTES`), for
/// every Linear in fp16 and bf16 (autocast or pure), but in fp32 for the first Linear of a branch only: an output
/// projection's bias (`out_proj`) is then added by the fused residual-add kernel after a plain `mm`, which takes
/// cuBLAS's. Traces of the fake-cuda tracker (which tells the two apart, `takes_cublaslt`):
/// `narrow-128-fp32-bias-compiled`, 8 addmm and 9 mm per forward (4 layers, the head); `gpt2-124m-bias-fp16-compiled`,
/// 48 addmm and the head's mm; the same narrow model in pure bf16 and in bf16-amp, 16 addmm and 1 mm.
fn linear_workspace(cx: &mut Ctx, bias: bool, out_proj: bool) {
    if bias && (cx.p == 2 || !out_proj) {
        cx.addmm_workspace();
    } else {
        cx.matmul_workspace();
    }
}

/// `mm` for a Linear of the forward (`linear_workspace`).
fn linear_mm(
    cx: &mut Ctx,
    bytes: u64,
    width: u64,
    cat: Category,
    (bias, out_proj): (bool, bool),
) -> Tensor {
    let t = alloc_as(cx, bytes, width, cat, "mm");
    linear_workspace(cx, bias, out_proj);
    t
}

/// One Linear's weight as the compiled matmul reads it: a 2-byte cast under autocast (saved for backward),
/// the parameter itself otherwise.
fn weight_cast(cx: &mut Ctx, elems: u64) -> Option<Tensor> {
    cx.prec
        .autocast()
        .then(|| alloc_as(cx, elems * 2, 2, WeightCopies, "_to_copy"))
}

/// A norm as the partitioned forward saves it: its output in the matmul dtype (the fused norm kernel writes it
/// directly) and one fp32 per-row statistic.
struct NormOut {
    stat: Tensor,
    out: Tensor,
}

fn norm_op(cx: &Ctx) -> (&'static str, &'static str) {
    match cx.arch.norm {
        Norm::LayerNorm { .. } => ("layer_norm rstd", "layer_norm"),
        // Gemma's `(1 + weight)` is in the same fused kernel: the same buffers (wrapper of
        // `gemma-512-hd256-mqa-bf16amp-compiled`), and OLMo 2's (`olmo2-512-untied-bf16amp-compiled`).
        Norm::RmsNorm | Norm::GemmaRmsNorm | Norm::Olmo2RmsNorm => ("rms_norm rsqrt", "rms_norm"),
    }
}

/// A block's norm. `fused_after_branch`: the norm after the attention branch, which Inductor fuses with the
/// residual add (and dropout); for LayerNorm that kernel's output buffer comes before its statistic (measured),
/// everywhere else the statistic comes first.
fn norm_fwd(cx: &mut Ctx, fused_after_branch: bool) -> NormOut {
    let nc = cx.n * cx.m.n_embd;
    let (stat_op, op) = norm_op(cx);
    let norm = if fused_after_branch && matches!(cx.arch.norm, Norm::LayerNorm { .. }) {
        let out = alloc_as(cx, nc * cx.p, cx.p, Activations, op);
        let stat = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
        NormOut { stat, out }
    } else {
        let stat = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
        let out = alloc_as(cx, nc * cx.p, cx.p, Activations, op);
        NormOut { stat, out }
    };
    cx.sim.next_kernel_made();
    norm
}

enum CoreSaved {
    Sdpa(SdpaSaved, Tensor),
    /// Manual path: q, k, v copies, the probabilities (B x H x T x T) with the softmax's two per-row
    /// statistics, the scores as well under autocast or with dropout, the dropout mask, and the contiguous output.
    Manual {
        qkv: [Tensor; 3],
        scores: Option<Tensor>,
        probs: Tensor,
        stats: [Tensor; 2],
        mask: Option<Tensor>,
        y: Tensor,
    },
}

/// What the attention saves.
enum Attn {
    /// nanoGPT's: the fused QKV weight cast, the kernel's saved tensors, the output projection's weight cast.
    Fused {
        w_attn: Option<Tensor>,
        core: CoreSaved,
        w_proj: Option<Tensor>,
    },
    /// HF Llama's: the rotated q and k, v (kv width), SDPA's saved tensors, the q/k/v/o weight casts, and with
    /// q/k norms what their backward reads.
    Separate {
        q_rot: Tensor,
        k_rot: Tensor,
        v: Tensor,
        core: SeparateCore,
        casts: [Option<Tensor>; 4],
        qk_norm: Option<QkNorm>,
        /// GPT-NeoX's attention output made contiguous in token order (`neox_block_fwd`), which o_proj's weight
        /// gradient reads.
        y_t: Option<Tensor>,
    },
}

/// The kernel of a separate-projection attention, as the partitioned forward saves it.
enum SeparateCore {
    /// SDPA's saved tensors; `masked`: through the sliding-window mask (memory-efficient attention on k and v
    /// repeated to every head).
    Sdpa { saved: SdpaSaved, masked: bool },
    /// Hugging Face's eager attention (`eager_attention_forward`: `q @ k^T`, scale, soft-cap, `+ mask`, fp32
    /// softmax cast back, `@ v`), where k and v are repeated to every head (`k_rot` and `v` are then q's width).
    Eager(EagerSaved),
}

/// What the partitioned forward saves of Hugging Face's eager attention (wrappers of
/// `llama-manual-512-gqa-bf16amp-compiled` and `gemma2-512-hd256-win256-bf16amp-compiled`, 4 layers each):
/// the probabilities in the matmul dtype (the `@ v` backward reads them) and, for the softmax's backward, either
/// the fp32 probabilities or the raw scores (the `q @ k^T` output, matmul dtype) with the softmax's two fp32
/// row statistics (max and sum, [B, H, T]), from which its backward kernel recomputes the probabilities. In
/// both wrappers the first layer keeps the statistics and every later layer the fp32 probabilities (the min-cut
/// partitioner's choice; what decides it, beyond the layer's place, was not traced, so deeper models follow
/// the same rule unmeasured). Soft-capped scores (Gemma 2's `tanh(s / cap) * cap`) keep the raw scores in every
/// layer: the tanh's backward reads them. The attention output's head-to-token transpose is a contiguous copy,
/// saved for o_proj's weight gradient. In fp32 one probability tensor serves both.
struct EagerSaved {
    scores: Option<Tensor>,
    stats: Option<[Tensor; 2]>,
    probs32: Option<Tensor>,
    probs: Tensor,
    y: Tensor,
}

impl EagerSaved {
    fn release(self, cx: &mut Ctx) {
        cx.sim.free_some(&[self.scores, self.probs32]);
        if let Some(stats) = self.stats {
            cx.sim.free_all(&stats);
        }
        cx.sim.free_all(&[self.probs, self.y]);
    }
}

/// What q/k norms (an RMSNorm over each head of q and k before rotary, Qwen 3's `q_norm` and `k_norm`) leave
/// saved: the projections themselves (their norm's backward reads them; Llama's die once rotated) and one fp32
/// statistic per head and token (`rsqrt`, [B, T, heads, 1]). Wrapper of `qwen3-512-hd128-tied-bf16amp-compiled`:
/// `mm`, `rsqrt` and the rotated copy of q, then k's, among the forward's outputs.
struct QkNorm {
    q: Tensor,
    q_stat: Tensor,
    k: Tensor,
    k_stat: Tensor,
}

/// What the MLP saves.
enum MlpSaved {
    /// fc's output and GELU's, with both weight casts.
    Gelu {
        w_fc: Option<Tensor>,
        h: Tensor,
        w_mlp: Option<Tensor>,
        g: Tensor,
    },
    /// The gate and up outputs and their SiLU product, with the three weight casts.
    SwiGlu {
        out: [Tensor; 3],
        casts: [Option<Tensor>; 3],
    },
    /// The packed gate/up output and the product, with the two weight casts.
    PackedGlu {
        gate_up: Tensor,
        prod: Tensor,
        casts: [Option<Tensor>; 2],
    },
    /// A mixture of experts (`moe_fwd`).
    Moe(MoeSaved),
}

struct Block {
    x_in: Tensor,
    /// The norm before each branch (`None`: the branch reads the stream itself, OLMo 2's).
    norm1: Option<NormOut>,
    /// ln_1's mean, kept beside its statistic where the stream it normalises is never written (`Inlined`: the
    /// first block's input is the embeddings' sum, which its norm's backward recomputes).
    mean_1: Option<Tensor>,
    attn: Attn,
    /// The stream after the attention branch; `None` in a checkpointed block's first run (see
    /// `separate_attn_fwd`).
    x_mid: Option<Tensor>,
    masks: [Option<Tensor>; 2],
    norm2: Option<NormOut>,
    mlp: MlpSaved,
    /// Each branch's post-norm (attention's, MLP's), if the model has them.
    post: [Option<PostNorm>; 2],
}

/// Whether the sequence reaches the model's sliding window: transformers 5 then passes SDPA an explicit mask
/// (`masking_utils._ignore_causal_mask_sdpa`: kv_length >= window) in the layers that slide.
fn window_reached(cx: &Ctx) -> bool {
    cx.m.sliding_window > 0 && cx.t >= cx.m.sliding_window
}

/// What the compiled forward leaves: the saved tensors, and the logits (saved: the fused loss backward reads
/// them; nanoGPT's loop also keeps them bound).
pub struct Forward {
    blocks: Vec<Saved<Block>>,
    idx: Tensor,
    /// The targets the fused loss saved: the batch's (nanoGPT), or the padded and shifted labels (HF).
    targets: Tensor,
    pos: Option<Tensor>,
    /// The position indices (`torch.arange(0, t)`, int64), saved for the position embedding's backward.
    iota: Option<Tensor>,
    emb_mask: Option<Tensor>,
    /// The sliding-window mask of the masked layers (`separate_attn_fwd`).
    window_mask: Option<Tensor>,
    /// The last block's output; `None` when checkpointed (recomputed in the backward).
    x_last: Option<Tensor>,
    norm_f: Tensor,
    norm_f_stats: [Option<Tensor>; 2],
    head_cast: Option<Tensor>,
    logits: Tensor,
    /// The head's GEMM output when the logits are soft-capped (saved for the cap's backward).
    raw_logits: Option<Tensor>,
    ce_stats: [Tensor; 2],
    loss: Tensor,
}

impl Forward {
    /// The logits when the training program keeps them bound after the step (nanoGPT's `logits, loss =
    /// model(X, Y)`); the Hugging Face loop lets only the loss hold them.
    pub fn returned_logits(&self, cx: &Ctx) -> Option<Tensor> {
        (cx.arch.program == Program::NanoGpt).then_some(self.logits)
    }
}

fn mask(cx: &mut Ctx, elems: u64) -> Option<Tensor> {
    // Dropout under Inductor: Philox random numbers in the kernel, the keep-mask saved as bool (1 byte).
    cx.arch
        .dropout
        .then(|| alloc_as(cx, elems, 1, Activations, "native_dropout"))
}

/// A residual dropout's mask. Recomputed in the backward graph of a checkpointed block, the dropout draws its
/// random numbers from the forward's Philox seed and offset (AOTAutograd functionalises the random op so that
/// the recompute reproduces it) and keeps them as fp32 [N, C] values rather than a bool mask (trace of
/// `shakespeare-char-ckpt-compiled`: no 1-byte mask; the attention dropout's values beside the stream after
/// attention, the last block's MLP dropout's beside its output, `gelu_block_backward`).
fn residual_mask(cx: &mut Ctx, elems: u64, recompute: bool) -> Option<Tensor> {
    if recompute {
        cx.arch
            .dropout
            .then(|| alloc_as(cx, elems * 4, 4, Activations, "philox_rand"))
    } else {
        mask(cx, elems)
    }
}

/// What the forward's wrapper still holds of the blocks' branch outputs: buffers it releases only at the end of the
/// forward (`deferred`), and, in nanoGPT's blocks without dropout, the residual stream's adds it inlines
/// (`inlined`).
#[derive(Default)]
struct Held {
    deferred: Vec<Tensor>,
    inlined: Option<Inlined>,
}

/// The residual stream of nanoGPT's blocks without dropout, as Inductor computes it: each add is a pointwise node
/// inlined into the kernel that reads it (the residual add fused with the next norm), so that kernel reads the
/// stream's start and every branch output since, which stay alive until then; a kernel that would read more than
/// `REALIZE_READS` buffers realizes the sum into an fp32 buffer of its own (written in place from then on), and
/// the branch outputs it read die with it. The stream starts as the token and position embeddings (two reads).
/// Wrappers of `tiny-vocab-grads-amp-compiled` with 1, 2, 3 and 4 layers and of `nanogpt-30m-founding-compiled`
/// (6 layers): the first realization is in the second block's post-attention kernel (`buf43`, reading `buf1,
/// buf2, buf17, buf27, buf42`), then every second block; the final norm's kernel writes the last stream over the
/// realized buffer (`buf57 = buf43  # reuse` with 2 layers), which is what the backward saves.
struct Inlined {
    /// The buffers the stream's start takes to read: the embeddings, or the realized sum.
    base_reads: u64,
    /// Branch outputs added since.
    branches: Vec<Tensor>,
    realized: Option<Tensor>,
}

/// Inductor's `config.realize_reads_threshold` (torch/_inductor/config.py, 4 in torch 2.15): a pointwise node
/// read by a kernel is realized when it would read more buffers than this.
const REALIZE_READS: u64 = 4;

impl Inlined {
    fn new() -> Inlined {
        Inlined {
            base_reads: 2,
            branches: Vec::new(),
            realized: None,
        }
    }

    /// A kernel adds `branch` to the stream. Past `REALIZE_READS` it realizes the sum: its fp32 buffer is
    /// allocated, the first time, before the kernel's other outputs, and what the kernel read dies once they exist.
    fn add(&mut self, cx: &mut Ctx, branch: Tensor) {
        self.branches.push(branch);
        if self.base_reads + self.branches.len() as u64 <= REALIZE_READS {
            return;
        }
        if self.realized.is_none() {
            let nc = cx.n * cx.m.n_embd;
            self.realized = Some(alloc_as(cx, nc * cx.r, cx.r, Activations, "add"));
        }
        for b in self.branches.drain(..) {
            cx.sim.free_after_next_kernel(b);
        }
        self.base_reads = 1;
    }
}

/// nanoGPT's attention on ln_1's output: the fused QKV GEMM, the kernel, the output projection, and the stream
/// after the branch (`x_mid`, with the residual dropout's mask). The projection's output is read by the fused
/// residual-add kernel: in nanoGPT's blocks without dropout it is a branch of the inlined stream (`Inlined`), read
/// until the stream is realized or the final norm's kernel; elsewhere without dropout the wrapper releases it at the
/// end of the forward (`deferred`); with dropout it hands the buffer on to the next block (`# reuse`), so it is
/// free for the rest of the forward (measured: only the last block's is released at the end).
fn fused_attn_fwd(
    cx: &mut Ctx,
    last: bool,
    held: &mut Held,
    recompute: bool,
    discarded: bool,
) -> (Attn, Tensor, Option<Tensor>) {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let w_attn = weight_cast(cx, 3 * c * c);
    let qkv = linear_mm(cx, 3 * nc * p, p, Activations, (cx.arch.qkv_bias, false));
    let core = match cx.arch.core {
        Core::Sdpa => CoreSaved::Sdpa(extern_kernel(cx, ops::sdpa_fwd), qkv),
        Core::Manual => {
            let s = ops::manual_scores_elems(cx);
            let q = alloc_as(cx, nc * p, p, Activations, "clone");
            let k = alloc_as(cx, nc * p, p, Activations, "clone");
            // One T x T buffer is saved (the probabilities) in fp32 and pure bf16 without dropout; under autocast
            // or with dropout the partitioner keeps the scores too (measured: two per block, plus the mask).
            let scores = (cx.prec.autocast() || cx.arch.dropout)
                .then(|| mm(cx, s * p, p, Activations, "bmm"));
            let bht = cx.b * cx.m.n_head * cx.t * 4;
            let stats = [
                alloc_as(cx, bht, 4, Activations, "softmax max"),
                alloc_as(cx, bht, 4, Activations, "softmax sum"),
            ];
            let probs = alloc_as(cx, s * p, p, Activations, "softmax");
            let mask = mask(cx, s);
            let v = alloc_as(cx, nc * p, p, Activations, "clone");
            // The fused QKV output is read by the three copies only: released (or handed to a later buffer as
            // `# reuse`) once they are made.
            cx.free(qkv);
            let y = mm(cx, nc * p, p, Activations, "bmm");
            CoreSaved::Manual {
                qkv: [q, k, v],
                scores,
                probs,
                stats,
                mask,
                y,
            }
        }
    };
    let w_proj = weight_cast(cx, c * c);
    let proj = linear_mm(cx, nc * p, p, Temporary, (cx.arch.linear_bias, true));
    if let Some(stream) = held.inlined.as_mut() {
        stream.add(cx, proj);
    }
    let x_mid = alloc_as(cx, nc * r, cx.r, Activations, "add");
    let mask1 = (!discarded)
        .then(|| residual_mask(cx, nc, recompute))
        .flatten();
    if held.inlined.is_none() {
        if cx.arch.dropout && !last {
            cx.free(proj);
        } else {
            held.deferred.push(proj);
        }
    }
    let attn = Attn::Fused {
        w_attn,
        core,
        w_proj,
    };
    (attn, x_mid, mask1)
}

/// HF Llama's attention on input_layernorm's output: q, k, v GEMMs, rotary fused into one kernel each for q and
/// k (the unrotated projections die with it), SDPA, o_proj, and the stream after the branch: fp32 under
/// autocast, but the first layer of unscaled embeddings keeps a 2-byte buffer there (measured). A checkpointed
/// block's first run
/// (`discarded`) never materializes that stream: one kernel computes the next norm from the block input and
/// o_proj's output (wrappers of the forwards of `llama-ckpt-seq2048-vocab8192` and `llama-ckpt-bf16-tied-accum2`).
fn separate_attn_fwd(
    cx: &mut Ctx,
    first: bool,
    discarded: bool,
    window: Option<&mut Option<Tensor>>,
) -> (Attn, Option<Tensor>, Option<Tensor>, Option<PostNorm>) {
    let c = cx.m.n_embd;
    let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    // Through an explicit sliding-window mask transformers repeats k and v to every head (`repeat_kv`): k's
    // repeat is written by its rotary kernel at the full width; v's is a copy when each KV head serves several
    // heads, a stride-0 view of the projection when one serves all, nothing when none is shared (wrappers of
    // `mistral-512-win128-bf16amp-compiled`, 2 of 8 heads, and `gemma3-512-hd256-win256-bf16amp-compiled`, 1 of 4).
    let masked = window.is_some();
    // HF's eager attention repeats k and v to every head too, and its `@` reads them head-major: k's repeat is
    // written by its rotary kernel (saved), v's is always a copy (saved), and the scores' GEMM reads a transposed
    // copy of rotated k, written over q's projection, which dies with that GEMM (wrapper of
    // `llama-manual-512-gqa-bf16amp-compiled`).
    // Traced on separate projections without q/k norms; the others are refused (`Setup::validate`) and walk SDPA's.
    let eager = cx.arch.core == Core::Manual && cx.arch.qkv == Qkv::Separate && !cx.arch.qk_norm;
    let k_width = if masked || eager { qd } else { kv };
    let copy_v = (masked && cx.m.n_kv_head > 1 && cx.m.n_kv_head < cx.m.n_head) || eager;
    let mut k_t = None;
    // One packed q/k/v projection (Phi-3's `qkv_proj`): its output is saved whole, since SDPA reads v as a view
    // of it; q and k are rotated out of it (k first), and the rotary's concatenation on part of each head is
    // inside that kernel (wrapper of `phi3-512-untied-bf16amp-compiled`: no other buffer, and SDPA's output is read
    // by o_proj as it is).
    let packed = cx.arch.qkv == Qkv::PackedSlices;
    let w_q = weight_cast(cx, if packed { (qd + 2 * kv) * c } else { qd * c });
    let (q_rot, k_rot, v, w_k, w_v, qk_norm);
    if packed {
        let qkv = mm(cx, cx.n * (qd + 2 * kv) * p, p, Activations, "mm");
        k_rot = alloc_as(cx, cx.n * k_width * p, p, Activations, "rotary");
        q_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "rotary");
        (w_k, w_v, v, qk_norm) = (None, None, qkv, None);
    } else if cx.arch.qk_norm {
        // Each of q and k is normalised and rotated by one kernel as soon as its GEMM is done (its statistic,
        // then its rotated copy), v's GEMM last.
        // One statistic per head and token, or per token for a norm over the whole projection (OLMo 2's).
        let (h, kvh) = if cx.arch.qk_norm_full {
            (1, 1)
        } else {
            (cx.m.n_head, cx.m.n_kv_head)
        };
        let q = mm(cx, cx.n * qd * p, p, Activations, "mm");
        let q_stat = alloc_as(cx, cx.n * h * 4, 4, Activations, "rms_norm rsqrt");
        q_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "rotary");
        w_k = weight_cast(cx, kv * c);
        let k = mm(cx, cx.n * kv * p, p, Activations, "mm");
        let k_stat = alloc_as(cx, cx.n * kvh * 4, 4, Activations, "rms_norm rsqrt");
        k_rot = alloc_as(cx, cx.n * k_width * p, p, Activations, "rotary");
        w_v = weight_cast(cx, kv * c);
        let v_proj = mm(cx, cx.n * kv * p, p, Activations, "mm");
        v = if copy_v {
            let v_rep = alloc_as(cx, cx.n * qd * p, p, Activations, "repeat_kv");
            cx.free(v_proj);
            v_rep
        } else {
            v_proj
        };
        qk_norm = Some(QkNorm {
            q,
            q_stat,
            k,
            k_stat,
        });
    } else {
        let q = mm(cx, cx.n * qd * p, p, Temporary, "mm");
        w_k = weight_cast(cx, kv * c);
        w_v = weight_cast(cx, kv * c);
        let k = mm(cx, cx.n * kv * p, p, Temporary, "mm");
        let v_proj = mm(cx, cx.n * kv * p, p, Activations, "mm");
        qk_norm = None;
        if eager {
            // q rotated, then k rotated into its transposed copy (over q's projection) and its saved repeat; v's
            // repeat comes after the softmax (`eager_core_fwd`).
            q_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "rotary");
            cx.free(q);
            k_t = Some(alloc_as(
                cx,
                cx.n * qd * p,
                p,
                Temporary,
                "rotary (k transposed)",
            ));
            k_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "rotary");
            cx.free(k);
            v = v_proj;
        } else {
            let v_rep = copy_v.then(|| alloc_as(cx, cx.n * qd * p, p, Activations, "repeat_kv"));
            k_rot = alloc_as(cx, cx.n * k_width * p, p, Activations, "rotary");
            q_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "rotary");
            cx.sim.free_all(&[q, k]);
            v = match v_rep {
                Some(t) => {
                    cx.free(v_proj);
                    t
                }
                None => v_proj,
            };
        }
    }
    // The mask: built once per forward, at the first layer that needs it, as an additive [B, 1, T, T] tensor in
    // the query's dtype (the boolean mask and its conversion fused into one kernel), which every masked layer's
    // memory-efficient kernel and its backward read; it lives until the backward is done.
    let (core, v, w_o) = match (k_t, window) {
        (Some(k_t), _) => {
            let (saved, v_rep, w_o) = eager_core_fwd(cx, first, k_t, v);
            (SeparateCore::Eager(saved), v_rep, w_o)
        }
        (None, Some(slot)) => {
            if slot.is_none() {
                *slot = Some(alloc_as(
                    cx,
                    cx.b * cx.t * cx.t * p,
                    p,
                    Activations,
                    "sliding-window mask",
                ));
            }
            let saved = extern_kernel(cx, |cx| ops::sdpa_fwd_with(cx, SdpaBackend::Efficient));
            let w_o = weight_cast(cx, c * qd);
            (SeparateCore::Sdpa { saved, masked }, v, w_o)
        }
        (None, None) => {
            let saved = extern_kernel(cx, ops::sdpa_fwd);
            let w_o = weight_cast(cx, c * qd);
            (SeparateCore::Sdpa { saved, masked }, v, w_o)
        }
    };
    let o = mm(cx, nc * p, p, Temporary, "mm");
    let post = post_norm_fwd(cx, o);
    // The first layer's 2-byte buffer: its input is the embedding's rows, which the backward can gather again;
    // scaled embeddings (Gemma's normalizer) are a new fp32 tensor, and there the first layer saves the fp32
    // stream as every other (wrappers of `gemma-512-hd256-mqa-bf16amp-compiled` and
    // `gemma3-512-hd256-win256-bf16amp-compiled`).
    let low = first && !cx.arch.embed_scale && cx.arch.pre_norms;
    let width = if low { p } else { r };
    let x_mid = (!discarded).then(|| alloc_as(cx, nc * width, width, Activations, "add"));
    // o_proj's output is read last by the residual add, which Inductor fuses with the next norm.
    if post.is_none() {
        cx.sim.free_after_next_kernel(o);
    }
    let attn = Attn::Separate {
        q_rot,
        k_rot,
        v,
        core,
        casts: [w_q, w_k, w_v, w_o],
        qk_norm,
        y_t: None,
    };
    (attn, x_mid, None, post)
}

/// HF's eager attention core (see `EagerSaved`), from the scores' GEMM to the attention output's contiguous
/// transpose: the scores (B x H x T x T), one softmax kernel writing the row statistics (first layer) or the
/// fp32 probabilities (later layers) and the probabilities in the matmul dtype, v repeated to every head over
/// k's transposed copy (`k_t`, which dies there) with the projection released, the `@ v` GEMM, o_proj's weight
/// cast, then the transpose (the GEMM's output dies with it). Any sliding window is applied inside the softmax
/// kernel from indices: no mask tensor (wrapper of `gemma2-512-hd256-win256-bf16amp-compiled`). Returns (what is
/// saved, v's repeat, o_proj's weight cast).
fn eager_core_fwd(
    cx: &mut Ctx,
    first: bool,
    k_t: Tensor,
    v_proj: Tensor,
) -> (EagerSaved, Tensor, Option<Tensor>) {
    let (s, p) = (ops::manual_scores_elems(cx), cx.p);
    let nq = cx.n * cx.m.q_dim();
    let bht = cx.b * cx.m.n_head * cx.t * 4;
    let scores = mm(cx, s * p, p, Activations, "bmm");
    let (stats, probs32) = if first {
        let stats = [
            alloc_as(cx, bht, 4, Activations, "softmax max"),
            alloc_as(cx, bht, 4, Activations, "softmax sum"),
        ];
        (Some(stats), None)
    } else {
        // In fp32 the probabilities are already the matmul dtype: one tensor.
        let probs32 = (p != 4).then(|| alloc_as(cx, s * 4, 4, Activations, "softmax"));
        (None, probs32)
    };
    let probs = alloc_as(cx, s * p, p, Activations, "softmax");
    let scores = if first || cx.arch.attn_softcap {
        Some(scores)
    } else {
        cx.free(scores);
        None
    };
    let v_rep = alloc_as(cx, nq * p, p, Activations, "repeat_kv");
    cx.sim.free_all(&[k_t, v_proj]);
    let y_heads = mm(cx, nq * p, p, Temporary, "bmm");
    let w_o = weight_cast(cx, cx.m.n_embd * cx.m.q_dim());
    let y = alloc_as(cx, nq * p, p, Activations, "clone (transpose)");
    cx.free(y_heads);
    let saved = EagerSaved {
        scores,
        stats,
        probs32,
        probs,
        y,
    };
    (saved, v_rep, w_o)
}

/// A norm on a branch's output before the residual add (Gemma 2's and 3's `post_attention_layernorm` and
/// `post_feedforward_layernorm`, OLMo 2's): the partitioned forward saves the branch's output (the GEMM's, in the
/// matmul dtype) and the norm's fp32 row statistic, and the norm's output lives only in the residual add's kernel
/// (wrapper of `gemma3-512-hd256-win256-bf16amp-compiled`: o_proj's and down_proj's outputs and a [B, T, 1]
/// `rsqrt` each among the forward's outputs).
struct PostNorm {
    out: Tensor,
    stat: Tensor,
}

/// The MLP's end: the down projection's output through the post-norm (if any) into the residual add; the add's
/// output is kept when the block's output is wanted. Returns (block output, post-norm).
fn mlp_out(cx: &mut Ctx, down: Tensor, want_out: bool) -> (Option<Tensor>, Option<PostNorm>) {
    let post = post_norm_fwd(cx, down);
    let x_out = alloc_as(cx, cx.n * cx.m.n_embd * cx.r, cx.r, Activations, "add");
    // The residual add's kernel is the next norm's too (the next block's, or the final one).
    if post.is_none() {
        cx.sim.free_after_next_kernel(down);
    }
    let x_out = if want_out {
        Some(x_out)
    } else {
        cx.free(x_out);
        None
    };
    (x_out, post)
}

fn post_norm_fwd(cx: &mut Ctx, out: Tensor) -> Option<PostNorm> {
    cx.arch.post_norms.then(|| PostNorm {
        out,
        stat: alloc_as(cx, cx.n * 4, 4, Activations, "rms_norm rsqrt"),
    })
}

/// A post-norm's backward, entering with the residual gradient: the reduction of its weight's gradient, then one
/// kernel writing the branch output's gradient (matmul dtype) from the residual gradient, the saved output and
/// statistic (released after it). That gradient is what the branch's matmuls read: it takes the place of the
/// residual gradient's 2-byte copy, released with it.
fn post_norm_bwd(
    cx: &mut Ctx,
    post: Option<PostNorm>,
    g: &mut ResidualGrad,
    pending: &mut Vec<Tensor>,
) {
    let Some(post) = post else { return };
    norm_grads(cx, &[], pending);
    let g_out = alloc_as(
        cx,
        cx.n * cx.m.n_embd * cx.p,
        cx.p,
        Temporary,
        "rms_norm_backward",
    );
    release_low(cx, g);
    cx.sim.free_all(&[post.out, post.stat]);
    g.low = Some(g_out);
}

/// The MLP on the second norm's output and the residual add after it. `want_out`: whether the block's output is
/// made (a recomputed block's is dead code unless the final norm's backward reads it). GELU: the second GEMM's
/// output is read by the fused residual add and the next block's norm, and the add's buffer comes after it
/// (measured); SwiGLU: down_proj's output, the add, then the GEMM's output is released. In a checkpointed block's
/// first run (`discarded`) SwiGLU's product is written over the gate output, which dies with it (the wrappers of
/// `separate_attn_fwd`).
fn mlp_fwd(
    cx: &mut Ctx,
    last: bool,
    held: &mut Held,
    recompute: bool,
    want_out: bool,
    discarded: bool,
) -> (MlpSaved, Option<Tensor>, Option<Tensor>, Option<PostNorm>) {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    match cx.arch.mlp {
        Mlp::Gelu => {
            let bias = cx.arch.linear_bias;
            let w_fc = weight_cast(cx, i * c);
            let h = linear_mm(cx, cx.n * i * p, p, Activations, (bias, false));
            let w_mlp = weight_cast(cx, c * i);
            // In a checkpointed block's first run fc's output dies with GELU, which is written over it, and no
            // dropout mask is kept: the kernels draw from the Philox seed (wrapper of the forward of
            // `shakespeare-char-ckpt-compiled`: `buf28 = buf27  # reuse`, no bool buffer).
            let g = if discarded {
                h
            } else {
                alloc_as(cx, cx.n * i * p, p, Activations, "gelu")
            };
            let mask2 = (!discarded)
                .then(|| residual_mask(cx, nc, recompute))
                .flatten();
            // c_proj's output is a branch of the inlined stream; the last block's output is the final norm's
            // kernel's, written over the realized sum if there is one (the branches still unread die after it).
            let in_place = match held.inlined.as_mut() {
                Some(stream) => {
                    let out = linear_mm(cx, nc * p, p, Temporary, (bias, true));
                    stream.add(cx, out);
                    if last {
                        held.deferred.append(&mut stream.branches);
                        stream.realized.take()
                    } else {
                        None
                    }
                }
                None => {
                    linear_workspace(cx, bias, true);
                    None
                }
            };
            let x_out = in_place
                .or_else(|| want_out.then(|| alloc_as(cx, nc * r, cx.r, Activations, "add")));
            let saved = MlpSaved::Gelu { w_fc, h, w_mlp, g };
            (saved, mask2, x_out, None)
        }
        // One packed gate/up projection (Phi-3's `gate_up_proj`): its output is saved whole, the product beside it
        // (wrapper of `phi3-512-untied-bf16amp-compiled`).
        Mlp::SwiGlu | Mlp::GeGlu if cx.arch.packed_gate_up => {
            let w_gate_up = weight_cast(cx, 2 * i * c);
            let gate_up = mm(cx, cx.n * 2 * i * p, p, Activations, "mm");
            let w_down = weight_cast(cx, c * i);
            let prod = alloc_as(cx, cx.n * i * p, p, Activations, "silu_mul");
            let down = mm(cx, nc * p, p, Temporary, "mm");
            let (x_out, post) = mlp_out(cx, down, want_out);
            let saved = MlpSaved::PackedGlu {
                gate_up,
                prod,
                casts: [w_gate_up, w_down],
            };
            (saved, None, x_out, post)
        }
        Mlp::Moe(moe) => {
            let saved = moe_fwd(cx, moe);
            let x_out = alloc_as(cx, nc * r, cx.r, Activations, "add");
            let x_out = if want_out {
                Some(x_out)
            } else {
                cx.free(x_out);
                None
            };
            (MlpSaved::Moe(saved), None, x_out, None)
        }
        // GeGLU: SwiGLU's buffers, the tanh GELU in the product's kernel (wrapper of
        // `gemma-512-hd256-mqa-bf16amp-compiled`: gate, up and their product saved).
        Mlp::SwiGlu | Mlp::GeGlu => {
            let w_gate = weight_cast(cx, i * c);
            let gate = mm(cx, cx.n * i * p, p, Activations, "mm");
            let w_up = weight_cast(cx, i * c);
            let up = mm(cx, cx.n * i * p, p, Activations, "mm");
            let w_down = weight_cast(cx, c * i);
            let prod = if discarded {
                gate
            } else {
                alloc_as(cx, cx.n * i * p, p, Activations, "silu_mul")
            };
            let down = mm(cx, nc * p, p, Temporary, "mm");
            let (x_out, post) = mlp_out(cx, down, want_out);
            let saved = MlpSaved::SwiGlu {
                out: [gate, up, prod],
                casts: [w_gate, w_up, w_down],
            };
            (saved, None, x_out, post)
        }
    }
}

/// One block's compiled forward: (what it saves, its output if `want_out`). Buffers the wrapper releases only at
/// the end of the forward go to `deferred`. `discarded`: a checkpointed block's first run, whose tensors die with
/// the block. `window`: the forward's sliding-window mask, when this layer attends through it.
#[allow(clippy::too_many_arguments)]
fn block_fwd(
    cx: &mut Ctx,
    x_in: Tensor,
    (first, last): (bool, bool),
    held: &mut Held,
    recompute: bool,
    want_out: bool,
    discarded: bool,
    window: Option<&mut Option<Tensor>>,
) -> (Block, Option<Tensor>) {
    if cx.arch.parallel_residual {
        return neox_block_fwd(cx, x_in, first, want_out);
    }
    let pre = cx.arch.pre_norms;
    // Without a norm before the branches the matmuls read the stream: under autocast its 2-byte cast, which is
    // what the partitioned forward saves (the fp32 stream is not: no norm's backward reads it, and each one lives
    // until the next is made), otherwise the stream itself (wrapper of `olmo2-512-untied-bf16amp-compiled`).
    let cast = !pre && cx.r != cx.p;
    let nc = cx.n * cx.m.n_embd;
    let (x_in, stream_in) = if cast {
        (
            alloc_as(cx, nc * cx.p, cx.p, Activations, "_to_copy"),
            Some(x_in),
        )
    } else {
        (x_in, None)
    };
    // The first block's ln_1 reads the embeddings' sum unwritten: its kernel saves the mean and rstd (wrappers of
    // `Inlined`: `buf3`, `buf6`, read back as `getitem_1` and `rsqrt`).
    let mean_1 = (first && held.inlined.is_some())
        .then(|| alloc_as(cx, cx.n * 4, 4, Activations, "layer_norm mean"));
    let norm1 = pre.then(|| norm_fwd(cx, false));
    let (attn, x_mid, mask1, post1) = match cx.arch.qkv {
        Qkv::Fused => {
            let (attn, x_mid, mask1) = fused_attn_fwd(cx, last, held, recompute, discarded);
            (attn, Some(x_mid), mask1, None)
        }
        // GPT-NeoX's per-head packing comes with parallel branches: `neox_block_fwd`.
        Qkv::Separate | Qkv::PackedSlices | Qkv::PackedHeads => {
            separate_attn_fwd(cx, first, discarded, window)
        }
    };
    cx.sim.free_some(&[stream_in]);
    let (x_mid, stream_mid) = match x_mid {
        Some(x) if cast => (
            Some(alloc_as(cx, nc * cx.p, cx.p, Activations, "_to_copy")),
            Some(x),
        ),
        x => (x, None),
    };
    let norm2 = pre.then(|| norm_fwd(cx, true));
    let (mlp, mask2, x_out, post2) = mlp_fwd(cx, last, held, recompute, want_out, discarded);
    cx.sim.free_some(&[stream_mid]);
    let block = Block {
        x_in,
        norm1,
        mean_1,
        attn,
        x_mid,
        masks: [mask1, mask2],
        norm2,
        mlp,
        post: [post1, post2],
    };
    (block, x_out)
}

/// GPT-NeoX's layer (parallel branches, `use_parallel_residual`: `x + attn(ln_1(x)) + mlp(ln_2(x))`, q/k/v packed
/// per head, rotary on part of each head, biases everywhere), as the forward wrapper of
/// `neox-512-bf16amp-compiled` allocates it (torch 2.15, transformers 5.24; rotary on a quarter of each head).
/// One kernel normalises the stream for both branches: one pair of fp32 row statistics (mean and rstd, shared)
/// and both norm outputs. The packed q/k/v output is saved whole (SDPA reads v as a view of it). The rotary kernel
/// writes k rotated in the matmul dtype and q rotated in fp32 (the rotated part, computed with fp32 cos and sin,
/// concatenated with the part left as it is, promotes it), which a second kernel casts; both rotated copies are
/// saved and the fp32 one dies. q comes out head-major, so flash attention's output is head-major too and the
/// transpose to token order before o_proj is a contiguous copy, saved for o_proj's weight gradient. There is no
/// stream after attention: the next stream is written once, after the MLP, in `r` bytes, except after the first
/// layer, whose output the wrapper keeps as the branches' sum in the matmul dtype (the stream is recomputed from
/// the saved embedding output; `buf31 = reinterpret_tensor(buf30, ...)`, mlp's output buffer).
fn neox_block_fwd(
    cx: &mut Ctx,
    x_in: Tensor,
    first: bool,
    want_out: bool,
) -> (Block, Option<Tensor>) {
    let c = cx.m.n_embd;
    let (qd, kv, i) = (cx.m.q_dim(), cx.m.kv_dim(), cx.m.intermediate_size);
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let (stat_op, op) = norm_op(cx);
    let mean = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
    let rstd = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
    let ln1 = alloc_as(cx, nc * p, p, Activations, op);
    let ln2 = alloc_as(cx, nc * p, p, Activations, op);
    let w_qkv = weight_cast(cx, (qd + 2 * kv) * c);
    let qkv = linear_mm(
        cx,
        cx.n * (qd + 2 * kv) * p,
        p,
        Activations,
        (cx.arch.qkv_bias, false),
    );
    let q32 = alloc_as(cx, cx.n * qd * 4, 4, Temporary, "rotary (fp32)");
    let k_rot = alloc_as(cx, cx.n * kv * p, p, Activations, "rotary");
    let q_rot = alloc_as(cx, cx.n * qd * p, p, Activations, "_to_copy");
    cx.free(q32);
    let saved = extern_kernel(cx, ops::sdpa_fwd);
    let y_t = alloc_as(cx, cx.n * qd * p, p, Activations, "clone (transpose)");
    let w_o = weight_cast(cx, c * qd);
    let bias = cx.arch.linear_bias;
    let o = linear_mm(cx, nc * p, p, Temporary, (bias, true));
    let w_fc = weight_cast(cx, i * c);
    let h = linear_mm(cx, cx.n * i * p, p, Activations, (bias, false));
    let g = alloc_as(cx, cx.n * i * p, p, Activations, "gelu");
    let w_mlp = weight_cast(cx, c * i);
    let down = linear_mm(cx, nc * p, p, Temporary, (bias, true));
    cx.free(down);
    let low = first && cx.m.n_layer > 1;
    let width = if low { p } else { r };
    let x_out = want_out.then(|| alloc_as(cx, nc * width, width, Activations, "add"));
    cx.free(o);
    let attn = Attn::Separate {
        q_rot,
        k_rot,
        v: qkv,
        core: SeparateCore::Sdpa {
            saved,
            masked: false,
        },
        casts: [w_qkv, None, None, w_o],
        qk_norm: None,
        y_t: Some(y_t),
    };
    let block = Block {
        x_in,
        norm1: Some(NormOut {
            stat: mean,
            out: ln1,
        }),
        mean_1: None,
        attn,
        x_mid: None,
        masks: [None, None],
        norm2: Some(NormOut {
            stat: rstd,
            out: ln2,
        }),
        mlp: MlpSaved::Gelu { w_fc, h, w_mlp, g },
        post: [None, None],
    };
    (block, x_out)
}

/// Compiled forward and loss. `idx` and `targets` are the batch (saved: the embedding and loss backward read
/// them; the HF loss saves its own shifted copy of the labels).
pub fn forward(cx: &mut Ctx, idx: Tensor, targets: Tensor, checkpointing: bool) -> Forward {
    begin_graph(cx);
    let f = forward_graph(cx, idx, targets, checkpointing);
    cx.sim.end_graph();
    f
}

/// Whether the wrapper's buffer reuse is replayed (`Sim::begin_graph`, `plan_reuse`): Inductor's memory planning,
/// on in every `torch.compile` (`config.allow_buffer_reuse`). The rule is Inductor's, but it pairs each dead buffer
/// with the next allocation of its key in the model's order, which follows Inductor's kernels block by block but
/// not everywhere (LPMF's order is not run), and its estimated-peak check uses the model's live bytes, not
/// Inductor's `estimate_peak_memory`. Measured over the 73 stub-cuda compiled records (issue 10), on against off:
/// allocated within 2% 73/73 (median 0.37%) against 72/73 (0.39%); reserved within 3% 72/73 (median 0.05%)
/// against 71/73 (0.10%). The checkpointed nanoGPT blocks (`gelu_block_discarded`, `gelu_block_backward`) follow
/// the wrapper only with it on: `shakespeare-char-ckpt-compiled`'s reserved is -2.4% on, -9.8% off (steps 1 to 3:
/// 666, 692, 740 MiB modelled, 650, 678, 758 measured). (Figures measured before `Inlined`, which brought the
/// compiled reserved median to 0.00%.) `tiny-vocab-grads-amp` stays at -4.0% (48 MiB against 50) either way: its
/// measured allocations, replayed without either of the two reuses LPMF's order gives its backward, reserve 48 too
/// (tests/data/stub-cuda/README.md).
const INDUCTOR_BUFFER_REUSE: bool = true;

/// A compiled graph starts (`INDUCTOR_BUFFER_REUSE`).
fn begin_graph(cx: &mut Ctx) {
    if INDUCTOR_BUFFER_REUSE {
        cx.sim.begin_graph();
    }
}

/// The compiled forward graph (`forward`).
fn forward_graph(cx: &mut Ctx, idx: Tensor, targets: Tensor, checkpointing: bool) -> Forward {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let (r, pb) = (cx.r, cx.pb);
    // nanoGPT's `torch.arange(0, t)`: the forward's first buffer, saved (wrappers of `tiny-vocab-grads-amp-compiled`
    // with and without dropout, `nanogpt-30m-founding-compiled`: `buf0`, read back as `iota`).
    let iota = (cx.arch.positions == Positions::Learned)
        .then(|| alloc_as(cx, cx.t * 8, 8, Activations, "arange"));
    let (pos, x0) = match cx.arch.positions {
        // The position embedding rows (T x C, parameter dtype) are saved when no dropout follows; the residual
        // stream starts as tok + pos in `r` bytes.
        Positions::Learned => {
            let pos = (!cx.arch.dropout)
                .then(|| alloc_as(cx, cx.t * c * pb, cx.pb, Activations, "embedding"));
            (pos, alloc_as(cx, nc * r, cx.r, Activations, "add"))
        }
        // Rotary cos and sin are computed inside the attention kernels' prologue: no buffer.
        Positions::Rotary => (None, alloc_as(cx, nc * r, cx.r, Activations, "embedding")),
    };
    let emb_mask = match cx.arch.positions {
        Positions::Learned => mask(cx, nc),
        Positions::Rotary => None,
    };
    let mut held = Held {
        deferred: Vec::new(),
        // Measured with learned positions (the stream's start is two buffers, `Inlined::new`), as nanoGPT has.
        inlined: (gelu_block(cx)
            && cx.arch.positions == Positions::Learned
            && !cx.arch.dropout
            && !checkpointing)
            .then(Inlined::new),
    };
    let mut blocks = Vec::new();
    let mut window_mask = None;
    let mut x = x0;
    for l in 0..cx.m.n_layer {
        cx.sim.layer(Some(l as u32));
        let place = (l == 0, l + 1 == cx.m.n_layer);
        if checkpointing && gelu_block(cx) {
            blocks.push(Saved::Input(x));
            x = gelu_block_discarded(cx);
        } else if checkpointing {
            let mut transient = Held::default();
            let (b, x_out) = block_fwd(cx, x, place, &mut transient, false, true, true, None);
            cx.sim.free_all(&transient.deferred);
            blocks.push(Saved::Input(discard_block(cx, b)));
            x = x_out.expect("wanted");
        } else {
            // Checkpointed blocks with a window are refused (`Setup::validate`): not measured.
            let masked = window_reached(cx) && cx.arch.layer_slides(l);
            let window = masked.then_some(&mut window_mask);
            let (b, x_out) = block_fwd(cx, x, place, &mut held, false, true, false, window);
            blocks.push(Saved::All(b));
            x = x_out.expect("wanted");
        }
    }
    cx.sim.layer(None);
    let (norm_f, norm_f_stats) = final_norm(cx, checkpointing);
    cx.sim.free_all(&held.deferred);
    // Checkpointed, the last block's output is a recomputable node the partitioner does not save: the final
    // norm's backward waits for the last block's recompute (trace of the 2-layer fp16-amp variant: the forward
    // hands that buffer on, the backward allocates it again after the head's matmuls).
    let x_last = if checkpointing {
        cx.free(x);
        None
    } else {
        Some(x)
    };
    let (head_cast, logits, raw_logits, ce_stats) = head_forward(cx);
    let targets = match cx.arch.program {
        Program::NanoGpt => targets,
        // HF's loss pads and shifts the labels (int64, saved by the fused loss).
        Program::HfLoop => alloc_as(cx, cx.n * 8, 8, Activations, "constant_pad_nd"),
    };
    let loss = alloc_as(cx, 4, 4, Temporary, "loss");
    Forward {
        blocks,
        idx,
        targets,
        pos,
        iota,
        emb_mask,
        window_mask,
        x_last,
        norm_f,
        norm_f_stats,
        head_cast,
        logits,
        raw_logits,
        ce_stats,
        loss,
    }
}

/// What the forward keeps of a block: everything its backward reads, or, checkpointed
/// (`torch.utils.checkpoint(use_reentrant=False)` per block, HF's `gradient_checkpointing_enable`), only its
/// input. Under torch.compile AOTAutograd's partitioner sees the checkpoint regions' nodes tagged "recompute":
/// the partitioned forward saves none of them, only the regions' inputs, and the backward graph runs each
/// block's forward again right before its backward (traces of 2-layer variants, nanoGPT fp16-amp and pure bf16,
/// Llama bf16-amp and pure bf16: the backward allocates the block's norm outputs, statistics, weight casts, QKV,
/// SDPA output with its logsumexp and RNG state and the MLP's intermediates again, then its gradients).
enum Saved<B> {
    All(B),
    Input(Tensor),
}

/// The final norm's output (matmul dtype) and saved statistics: one row statistic, or, for a checkpointed
/// LayerNorm (its input not saved), two: the partitioner keeps both the mean and rstd (two fp32 [N] buffers in
/// the 2-layer fp16-amp trace). LayerNorm's output buffer comes first, RMSNorm's statistic (measured).
fn final_norm(cx: &mut Ctx, checkpointing: bool) -> (Tensor, [Option<Tensor>; 2]) {
    let nc = cx.n * cx.m.n_embd;
    let (stat_op, op) = norm_op(cx);
    let layer_norm = matches!(cx.arch.norm, Norm::LayerNorm { .. });
    let norm = if layer_norm {
        let out = alloc_as(cx, nc * cx.p, cx.p, Activations, op);
        let a = alloc_as(cx, cx.n * 4, 4, Activations, op);
        let b = checkpointing.then(|| alloc_as(cx, cx.n * 4, 4, Activations, op));
        (out, [Some(a), b])
    } else {
        let a = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
        let out = alloc_as(cx, nc * cx.p, cx.p, Activations, op);
        (out, [Some(a), None])
    };
    cx.sim.next_kernel_made();
    norm
}

/// A checkpointed block's forward run again in the backward graph: what it saves as in an uncheckpointed
/// forward, its output projection's transient, and (for the last block, whose output the final norm's backward
/// reads) the block's output, returned. Earlier blocks' outputs are not needed again.
fn block_recompute(cx: &mut Ctx, x_in: Tensor, l: u64) -> (Block, Option<Tensor>) {
    let last = l + 1 == cx.m.n_layer;
    let mut transient = Held::default();
    let (b, x_out) = block_fwd(
        cx,
        x_in,
        (l == 0, last),
        &mut transient,
        true,
        last,
        false,
        None,
    );
    // No norm follows a recomputed block: its residual add reads the branch output last.
    cx.sim.next_kernel_made();
    cx.sim.free_all(&transient.deferred);
    (b, x_out)
}

/// Whether the blocks are nanoGPT's (LayerNorm before each branch, the fused QKV projection, SDPA, the GELU MLP),
/// whose checkpointed runs follow the wrappers of `shakespeare-char-ckpt-compiled` (`gelu_block_discarded`).
fn gelu_block(cx: &Ctx) -> bool {
    let a = &cx.arch;
    a.qkv == Qkv::Fused
        && a.core == Core::Sdpa
        && a.mlp == Mlp::Gelu
        && a.pre_norms
        && !a.post_norms
        && !a.parallel_residual
        && matches!(a.norm, Norm::LayerNorm { .. })
}

/// A checkpointed nanoGPT block's first run, whose tensors all die in it (`gelu_block`), as the forward wrapper of
/// `shakespeare-char-ckpt-compiled` allocates and frees it: each buffer dies after its last reader, and nothing is
/// made for the backward. The norms write no statistic (nothing saves one), and no dropout mask exists (the
/// kernels draw from the Philox seed). The stream after attention and the block's output are one fp32 buffer,
/// written twice (`buf58 = buf47  # reuse`), the next block's input. Each weight cast dies after its GEMM, ln_1's
/// output after the QKV GEMM, SDPA's output after the output projection's, ln_2's after fc's, fc's output
/// (GELU written over it, `buf28 = buf27  # reuse`) after c_proj's. The output projection's and c_proj's outputs
/// are read last by the kernel that writes the block's output, fused with the next norm: they die once its
/// output exists (`del buf46` after the next ln_1's buffer). Returns the block's output.
fn gelu_block_discarded(cx: &mut Ctx) -> Tensor {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let bias = cx.arch.linear_bias;
    let (_, norm) = norm_op(cx);
    let ln_1 = alloc_as(cx, nc * p, p, Activations, norm);
    cx.sim.next_kernel_made();
    let w_attn = weight_cast(cx, 3 * c * c);
    let qkv = linear_mm(cx, 3 * nc * p, p, Activations, (cx.arch.qkv_bias, false));
    cx.sim.free_some(&[w_attn]);
    cx.free(ln_1);
    let a = extern_kernel(cx, ops::sdpa_fwd);
    cx.sim.free_all(&[a.lse, a.rng[0], a.rng[1], qkv]);
    let w_proj = weight_cast(cx, c * c);
    let proj = linear_mm(cx, nc * p, p, Temporary, (bias, true));
    cx.sim.free_some(&[w_proj]);
    cx.free(a.out);
    let x_out = alloc_as(cx, nc * r, r, Activations, "add");
    let ln_2 = alloc_as(cx, nc * p, p, Activations, norm);
    let w_fc = weight_cast(cx, i * c);
    let h = linear_mm(cx, cx.n * i * p, p, Activations, (bias, false));
    cx.sim.free_some(&[w_fc]);
    cx.free(ln_2);
    let w_mlp = weight_cast(cx, c * i);
    let out = linear_mm(cx, nc * p, p, Temporary, (bias, true));
    cx.sim.free_some(&[w_mlp]);
    cx.free(h);
    cx.sim.free_after_next_kernel(proj);
    cx.sim.free_after_next_kernel(out);
    x_out
}

/// A checkpointed block's forward keeps nothing but its input: everything else dies when the block is done
/// (in the traces Inductor hands those buffers to the next block, `# reuse`).
fn discard_block(cx: &mut Ctx, b: Block) -> Tensor {
    for n in [b.norm1, b.norm2].into_iter().flatten() {
        cx.sim.free_all(&[n.stat, n.out]);
    }
    for p in b.post.into_iter().flatten() {
        cx.sim.free_all(&[p.out, p.stat]);
    }
    cx.sim.free_some(&[b.x_mid]);
    cx.sim.free_some(&b.masks);
    match b.attn {
        Attn::Fused {
            w_attn,
            core,
            w_proj,
        } => {
            cx.sim.free_some(&[w_attn, w_proj]);
            match core {
                CoreSaved::Sdpa(a, qkv) => {
                    cx.sim.free_all(&a.tensors());
                    cx.free(qkv);
                }
                CoreSaved::Manual {
                    qkv,
                    scores,
                    probs,
                    stats,
                    mask,
                    y,
                } => {
                    cx.sim.free_all(&qkv);
                    cx.sim.free_all(&stats);
                    cx.sim.free_all(&[probs, y]);
                    cx.sim.free_some(&[scores, mask]);
                }
            }
        }
        Attn::Separate {
            q_rot,
            k_rot,
            v,
            core,
            casts,
            qk_norm,
            y_t,
        } => {
            cx.sim.free_all(&[q_rot, k_rot, v]);
            cx.sim.free_some(&[y_t]);
            match core {
                SeparateCore::Sdpa { saved, .. } => cx.sim.free_all(&saved.tensors()),
                SeparateCore::Eager(e) => e.release(cx),
            }
            cx.sim.free_some(&casts);
            if let Some(n) = qk_norm {
                cx.sim.free_all(&[n.q, n.q_stat, n.k, n.k_stat]);
            }
        }
    }
    match b.mlp {
        MlpSaved::Gelu { w_fc, h, w_mlp, g } => {
            cx.sim.free_all(&[h, g]);
            cx.sim.free_some(&[w_fc, w_mlp]);
        }
        MlpSaved::SwiGlu { out, casts } => {
            cx.sim.free_all(&out);
            cx.sim.free_some(&casts);
        }
        MlpSaved::PackedGlu {
            gate_up,
            prod,
            casts,
        } => {
            cx.sim.free_all(&[gate_up, prod]);
            cx.sim.free_some(&casts);
        }
        MlpSaved::Moe(m) => m.release(cx),
    }
    b.x_in
}

/// The loss stage of the forward: the LM head's weight cast (autocast), the logits in the matmul dtype
/// (returned, and saved by the fused loss), and the per-row max and log-sum-exp (fp32 [N]) the fused
/// cross-entropy keeps for its backward. Returns (cast, logits, statistics).
/// Soft-capped logits (Gemma 2's `final_logit_softcapping`) are a second buffer of the same size, written by
/// the cap's kernel: the model returns them and the loss reads them, and the GEMM's output is saved too, for
/// the tanh's backward (wrapper of `gemma2-512-hd256-win256-bf16amp-compiled`). Returns (cast, logits, the
/// GEMM's output when capped, statistics).
fn head_forward(cx: &mut Ctx) -> (Option<Tensor>, Tensor, Option<Tensor>, [Tensor; 2]) {
    cx.sim.next_stage("loss");
    let cast = weight_cast(cx, cx.m.vocab_size * cx.m.n_embd);
    let bytes = cx.n * padded_vocab(cx.m.vocab_size) * cx.p;
    let mut logits = mm(cx, bytes, cx.p, Logits, "mm");
    let mut raw = None;
    if cx.arch.logit_softcap {
        raw = Some(logits);
        logits = alloc_as(cx, bytes, cx.p, Logits, "tanh (final logit soft-cap)");
    }
    let stats = [
        alloc_as(cx, cx.n * 4, 4, Logits, "amax"),
        alloc_as(cx, cx.n * 4, 4, Logits, "logsumexp"),
    ];
    (cast, logits, raw, stats)
}

/// What a gradient the graph returns counts as: `.grad` itself in the first micro-step; later ones are added
/// into `.grad` and dropped.
fn grad_category(cx: &Ctx) -> Category {
    if cx.have_grads {
        Temporary
    } else {
        Grads
    }
}

/// A gradient for `.grad` (first micro-step) or for AccumulateGrad once the graph returns (later ones).
fn land_grad(cx: &mut Ctx, g: Tensor, pending: &mut Vec<Tensor>) {
    if cx.have_grads {
        pending.push(g);
    } else {
        cx.grads.push(g);
    }
}

/// The graph under way runs a new kernel reading `reads` (`Sim::kernel`): the allocations that follow are its
/// outputs.
fn kernel(cx: &mut Ctx, reads: &[Option<Tensor>]) {
    cx.sim.kernel(reads, None);
}

/// A norm's or a bias's gradient: a reduction kernel reading `reads` writes it in the parameter dtype.
fn reduce_grad(cx: &mut Ctx, reads: &[Option<Tensor>], elems: u64, pending: &mut Vec<Tensor>) {
    kernel(cx, reads);
    let cat = grad_category(cx);
    let g = alloc_as(cx, elems * cx.pb, cx.pb, cat, "sum");
    land_grad(cx, g, pending);
}

fn norm_grads(cx: &mut Ctx, reads: &[Option<Tensor>], pending: &mut Vec<Tensor>) {
    let bias = matches!(cx.arch.norm, Norm::LayerNorm { bias: true });
    for _ in 0..1 + u64::from(bias) {
        reduce_grad(cx, reads, cx.m.n_embd, pending);
    }
}

/// A Linear's backward (weight `out_f` x `in_f`) as the wrapper runs it: without a bias the weight gradient's
/// GEMM, the input gradient's GEMM, then (autocast) the conversion of the weight gradient; with one the input
/// gradient's GEMM first, then the weight gradient's, the bias's reduction and the conversion (wrappers of
/// `llama-3.2-1b-like-b1`, the founding case, `gpt2-124m-bias-fp16` and `narrow-128-fp32-bias`). `x`: saved
/// tensors the weight gradient's GEMM reads last; `w`: the weight cast the input gradient's GEMM reads. Returns
/// the input gradient (N x `in_f`, matmul dtype). `[grad, input]`: the output's gradient both GEMMs read and
/// the layer's input the weight gradient's reads without being its last reader (for `Sim::kernel`).
fn linear_bwd(
    cx: &mut Ctx,
    (out_f, in_f): (u64, u64),
    bias: bool,
    [grad, input]: [Option<Tensor>; 2],
    x: &[Option<Tensor>],
    w: Option<Tensor>,
    pending: &mut Vec<Tensor>,
) -> Tensor {
    let g_in = bias.then(|| input_grad(cx, grad, in_f, w));
    let low = weight_grad(cx, [grad, input], out_f * in_f, x, pending);
    let g_in = g_in.unwrap_or_else(|| input_grad(cx, grad, in_f, w));
    if bias {
        reduce_grad(cx, &[grad], out_f, pending);
    }
    convert_grad(cx, out_f * in_f, low, pending);
    g_in
}

/// A Linear's input-gradient GEMM, reading `grad`; then its weight cast is released.
fn input_grad(cx: &mut Ctx, grad: Option<Tensor>, in_f: u64, w: Option<Tensor>) -> Tensor {
    kernel(cx, &[grad, w]);
    let g = mm(cx, cx.n * in_f * cx.p, cx.p, Temporary, "mm");
    cx.sim.free_some(&[w]);
    g
}

/// A Linear's weight-gradient GEMM (`elems`); then the saved tensors `x` it read last are released. Under
/// autocast it writes the matmul dtype, returned for `convert_grad`; otherwise the gradient itself, landed.
fn weight_grad(
    cx: &mut Ctx,
    [grad, input]: [Option<Tensor>; 2],
    elems: u64,
    x: &[Option<Tensor>],
    pending: &mut Vec<Tensor>,
) -> Option<Tensor> {
    let mut reads = vec![grad, input];
    reads.extend_from_slice(x);
    kernel(cx, &reads);
    let low = if cx.prec.autocast() {
        Some(mm(cx, elems * cx.p, cx.p, Temporary, "mm"))
    } else {
        let cat = grad_category(cx);
        let g = mm(cx, elems * cx.pb, cx.pb, cat, "mm");
        land_grad(cx, g, pending);
        None
    };
    cx.sim.free_some(x);
    low
}

/// The pointwise kernel converting a 2-byte weight gradient (`elems`) to the parameter dtype.
fn convert_grad(cx: &mut Ctx, elems: u64, low: Option<Tensor>, pending: &mut Vec<Tensor>) {
    if let Some(low) = low {
        kernel(cx, &[Some(low)]);
        let cat = grad_category(cx);
        let g = alloc_as(cx, elems * cx.pb, cx.pb, cat, "_to_copy");
        cx.free(low);
        land_grad(cx, g, pending);
    }
}

/// The residual gradient in `r` bytes, which every norm's backward writes over itself (`buf23 = buf7  # reuse`
/// in every wrapper), and, under autocast, the 2-byte copy the matmuls read, new at each norm.
struct ResidualGrad {
    wide: Tensor,
    low: Option<Tensor>,
}

impl ResidualGrad {
    /// What the matmuls of a branch read: the 2-byte copy, else the residual gradient itself.
    fn read(&self) -> Option<Tensor> {
        self.low.or(Some(self.wide))
    }
}

/// The 2-byte copy's last reader has run. (Without one the matmuls read the residual gradient itself, which
/// lives on.)
fn release_low(cx: &mut Ctx, g: &mut ResidualGrad) {
    if let Some(t) = g.low.take() {
        cx.free(t);
    }
}

fn release_residual(cx: &mut Ctx, mut g: ResidualGrad) {
    release_low(cx, &mut g);
    cx.free(g.wide);
}

/// A norm's backward, fused with the residual add: the residual gradient is written over itself, under autocast
/// with a new 2-byte copy (`low`: when a matmul reads it next); it reads the gradients of the norm's output (`grads`, one per Linear reading it), the
/// saved statistic and input. RMSNorm's weight gradient is reduced before that kernel, LayerNorm's after it
/// (wrappers of `llama-3.2-1b-like-b1` and the founding case).
fn into_residual(
    cx: &mut Ctx,
    grads: Vec<Tensor>,
    (stat, x): (Option<Tensor>, Option<Tensor>),
    (g, low): (ResidualGrad, bool),
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    let Some(stat) = stat else {
        // No norm before the branch: its input gradients are added into the residual gradient, which a post-norm's
        // backward reads as it is (no 2-byte copy); the saved input's last readers have run.
        cx.sim.free_some(&[x]);
        cx.sim.free_all(&grads);
        return g;
    };
    let nc = cx.n * cx.m.n_embd;
    let layer_norm = matches!(cx.arch.norm, Norm::LayerNorm { .. });
    let mut reads: Vec<Option<Tensor>> = grads.iter().map(|&t| Some(t)).collect();
    reads.push(x);
    if !layer_norm {
        norm_grads(cx, &reads, pending);
    }
    let norm_reads = reads.clone();
    reads.extend([Some(stat), Some(g.wide)]);
    cx.sim.kernel_writing(&reads, g.wide);
    let low = (cx.r != cx.p && low).then(|| alloc_as(cx, nc * cx.p, cx.p, Temporary, "_to_copy"));
    cx.sim.free_some(&[x]);
    cx.sim.free_all(&grads);
    cx.free(stat);
    if layer_norm {
        norm_grads(cx, &norm_reads, pending);
    }
    ResidualGrad { wide: g.wide, low }
}

/// A branch's norm as its backward sees it: (its statistic, what the branch's weight gradients read last and
/// release, what the norm's backward reads and `into_residual` releases). Without a norm the branch's matmuls
/// read the saved input `x` itself, released by the last of them.
type NormParts = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn norm_parts(norm: Option<NormOut>, x: Option<Tensor>) -> NormParts {
    match norm {
        Some(n) => (Some(n.stat), Some(n.out), x),
        None => (None, x, None),
    }
}

/// `first`: the model's first block, whose input gradient goes to the embeddings' backward, which reads it in
/// fp32: no 2-byte copy is made (every recorded backward graph: tests/data/stub-cuda/inductor-graphs/).
fn block_bwd(
    cx: &mut Ctx,
    mut g: ResidualGrad,
    s: Block,
    first: bool,
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    if cx.arch.parallel_residual {
        return neox_block_bwd(cx, g, s, pending);
    }
    let [post1, post2] = s.post;
    post_norm_bwd(cx, post2, &mut g, pending);
    let (stat2, in2, x2) = norm_parts(s.norm2, s.x_mid);
    let grads = mlp_bwd(cx, s.mlp, in2, &mut g, pending);
    let mut g = into_residual(cx, grads, (stat2, x2), (g, true), pending);
    cx.sim.free_some(&[s.masks[1]]);
    post_norm_bwd(cx, post1, &mut g, pending);
    let (stat1, in1, x1) = norm_parts(s.norm1, Some(s.x_in));
    let grads = attn_bwd(cx, s.attn, s.masks[0], in1, &mut g, pending);
    // A mixture of experts reads the fp32 residual gradient itself: no 2-byte copy is made for it (`moe_bwd`).
    let low = !moe_reads_wide(cx) && !first;
    let g = into_residual(cx, grads, (stat1, x1), (g, low), pending);
    cx.sim.free_some(&[s.mean_1]);
    g
}

/// GPT-NeoX's layer backward (`neox_block_fwd`), in the order of the backward wrapper of
/// `neox-512-bf16amp-compiled`: both branches read the same 2-byte copy of the residual gradient. The MLP first
/// (its down projection's input gradient, weight gradient, bias and conversion; GELU's backward over that
/// gradient; fc's the same way, the bias of o_proj reduced with the down projection's, the same sum), then
/// o_proj's input gradient, SDPA's backward, rotary's backward for q and k, one kernel packing the q/k/v
/// gradients per head, the packed projection's input gradient, then one kernel for both norms' backward and the
/// residual add (the residual gradient written over itself, a new 2-byte copy) with their four parameter
/// reductions, and last the weight gradients of o_proj (the old copy's last reader) and of the packed projection.
fn neox_block_bwd(
    cx: &mut Ctx,
    g: ResidualGrad,
    s: Block,
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    let c = cx.m.n_embd;
    let (qd, kv, i) = (cx.m.q_dim(), cx.m.kv_dim(), cx.m.intermediate_size);
    let (bias, qkv_bias) = (cx.arch.linear_bias, cx.arch.qkv_bias);
    let (Some(n1), Some(n2)) = (s.norm1, s.norm2) else {
        unreachable!("GPT-NeoX's layers have both norms")
    };
    let MlpSaved::Gelu {
        w_fc,
        h,
        w_mlp,
        g: gelu,
    } = s.mlp
    else {
        unreachable!("GPT-NeoX's MLP is GELU")
    };
    let Attn::Separate {
        q_rot,
        k_rot,
        v: qkv,
        core: SeparateCore::Sdpa { saved, .. },
        casts: [w_qkv, _, _, w_o],
        y_t,
        ..
    } = s.attn
    else {
        unreachable!("GPT-NeoX's attention is SDPA on one packed projection")
    };
    let g_h = linear_bwd(
        cx,
        (c, i),
        bias,
        [None, None],
        &[Some(gelu)],
        w_mlp,
        pending,
    );
    if bias {
        reduce_grad(cx, &[], c, pending);
    }
    cx.free(h);
    let g_ln2 = linear_bwd(
        cx,
        (i, c),
        bias,
        [None, None],
        &[Some(n2.out)],
        w_fc,
        pending,
    );
    cx.free(g_h);
    let g_o = input_grad(cx, None, qd, w_o);
    let (dq, dk, dv) = extern_kernel(cx, ops::sdpa_bwd);
    cx.free(g_o);
    cx.sim.free_all(&saved.tensors());
    cx.sim.free_all(&[q_rot, k_rot, qkv]);
    let dq_un = rotary_bwd(cx, qd, None, pending);
    let dk_un = rotary_bwd(cx, kv, None, pending);
    let g_qkv = alloc_as(
        cx,
        cx.n * (qd + 2 * kv) * cx.p,
        cx.p,
        Temporary,
        "cat (per head)",
    );
    cx.sim.free_all(&[dq, dk, dv, dq_un, dk_un]);
    let g_ln1 = input_grad(cx, None, c, w_qkv);
    let low = (cx.r != cx.p).then(|| alloc_as(cx, cx.n * c * cx.p, cx.p, Temporary, "_to_copy"));
    cx.sim.free_all(&[g_ln1, g_ln2, s.x_in, n1.stat, n2.stat]);
    norm_grads(cx, &[], pending);
    norm_grads(cx, &[], pending);
    let low_o = weight_grad(cx, [None, None], c * qd, &[y_t], pending);
    convert_grad(cx, c * qd, low_o, pending);
    cx.sim.free_some(&[g.low]);
    let low_qkv = weight_grad(
        cx,
        [None, None],
        (qd + 2 * kv) * c,
        &[Some(n1.out)],
        pending,
    );
    if qkv_bias {
        reduce_grad(cx, &[], qd + 2 * kv, pending);
    }
    convert_grad(cx, (qd + 2 * kv) * c, low_qkv, pending);
    cx.free(g_qkv);
    ResidualGrad { wide: g.wide, low }
}

/// The MLP's backward, entering with the residual gradient `g`: returns the gradients of the norm's output, one
/// per Linear reading it.
fn mlp_bwd(
    cx: &mut Ctx,
    s: MlpSaved,
    norm_out: Option<Tensor>,
    g: &mut ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> Vec<Tensor> {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let bias = cx.arch.linear_bias;
    match s {
        // c_proj's weight gradient reads the GELU output; the GELU backward then writes the fc output's gradient
        // over c_proj's input gradient (`buf14 = buf12  # reuse`), reading the saved fc output.
        MlpSaved::Gelu {
            w_fc,
            h,
            w_mlp,
            g: gelu,
        } => {
            let g_h = linear_bwd(
                cx,
                (c, i),
                bias,
                [g.read(), None],
                &[Some(gelu)],
                w_mlp,
                pending,
            );
            release_low(cx, g);
            cx.sim.kernel_writing(&[Some(g_h), Some(h)], g_h);
            cx.free(h);
            let g_in = linear_bwd(
                cx,
                (i, c),
                bias,
                [Some(g_h), None],
                &[norm_out],
                w_fc,
                pending,
            );
            cx.free(g_h);
            vec![g_in]
        }
        // down_proj's weight gradient reads the product; the SiLU-and-multiply backward writes the gate's
        // gradient into a new buffer and the up projection's over the saved up output, which dies with it
        // (`buf16 = mm_110  # reuse`).
        MlpSaved::SwiGlu { out, casts } => swiglu_bwd(cx, (out, casts), i, norm_out, g, pending),
        // The product's backward writes both halves' gradients into one new [N, 2I] buffer (the packed
        // projection's), then the saved output dies; one Linear backward (wrapper of
        // `phi3-512-untied-bf16amp-compiled`).
        MlpSaved::PackedGlu {
            gate_up,
            prod,
            casts: [w_gate_up, w_down],
        } => {
            let g_prod = linear_bwd(
                cx,
                (c, i),
                bias,
                [None, None],
                &[Some(prod)],
                w_down,
                pending,
            );
            release_low(cx, g);
            let g_gate_up = alloc_as(
                cx,
                cx.n * 2 * i * cx.p,
                cx.p,
                Temporary,
                "silu_mul_backward",
            );
            cx.sim.free_all(&[g_prod, gate_up]);
            let g_in = linear_bwd(
                cx,
                (2 * i, c),
                bias,
                [None, None],
                &[norm_out],
                w_gate_up,
                pending,
            );
            cx.free(g_gate_up);
            vec![g_in]
        }
        MlpSaved::Moe(m) => moe_bwd(cx, m, norm_out, g, pending),
    }
}

/// SwiGLU's backward (`mlp_bwd`), `i` wide (Qwen2-MoE's shared expert: `moe_bwd`).
fn swiglu_bwd(
    cx: &mut Ctx,
    ([gate, up, prod], [w_gate, w_up, w_down]): ([Tensor; 3], [Option<Tensor>; 3]),
    i: u64,
    norm_out: Option<Tensor>,
    g: &mut ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> Vec<Tensor> {
    let c = cx.m.n_embd;
    let bias = cx.arch.linear_bias;
    let g_prod = linear_bwd(
        cx,
        (c, i),
        bias,
        [None, None],
        &[Some(prod)],
        w_down,
        pending,
    );
    release_low(cx, g);
    let g_gate = alloc_as(cx, cx.n * i * cx.p, cx.p, Temporary, "silu_mul_backward");
    let g_up = up;
    cx.sim.adopt(up);
    cx.sim.free_all(&[g_prod, gate]);
    let g_in1 = linear_bwd(cx, (i, c), bias, [None, None], &[], w_gate, pending);
    cx.free(g_gate);
    let g_in2 = linear_bwd(cx, (i, c), bias, [None, None], &[norm_out], w_up, pending);
    cx.free(g_up);
    vec![g_in1, g_in2]
}

/// The attention's backward (as `mlp_bwd`): the output projection, the kernel's backward and the projections
/// of q, k and v, for separate ones with rotary's backward between, each with its input gradient (v first, then
/// k and q: wrapper of `llama-3.2-1b-like-b1`).
fn attn_bwd(
    cx: &mut Ctx,
    a: Attn,
    mask: Option<Tensor>,
    norm_out: Option<Tensor>,
    g: &mut ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> Vec<Tensor> {
    let c = cx.m.n_embd;
    let (qd, nc) = (cx.m.q_dim(), cx.n * c);
    let p = cx.p;
    let (bias, qkv_bias) = (cx.arch.linear_bias, cx.arch.qkv_bias);
    match a {
        Attn::Fused {
            w_attn,
            core,
            w_proj,
        } => {
            // The output projection's weight gradient reads the attention output (the manual path's contiguous
            // copy; SDPA's output is read again by its backward).
            let y = match &core {
                CoreSaved::Manual { y, .. } => Some(*y),
                CoreSaved::Sdpa(..) => None,
            };
            let out = match &core {
                CoreSaved::Sdpa(a, _) => Some(a.out),
                CoreSaved::Manual { .. } => None,
            };
            let g_y = linear_bwd(cx, (c, qd), bias, [g.read(), out], &[y], w_proj, pending);
            release_low(cx, g);
            cx.sim.free_some(&[mask]);
            let g_qkv = match core {
                CoreSaved::Sdpa(a, qkv) => {
                    let mut reads: Vec<Option<Tensor>> = a.tensors().map(Some).to_vec();
                    reads.extend([Some(g_y), Some(qkv)]);
                    kernel(cx, &reads);
                    let (dq, dk, dv) = extern_kernel(cx, ops::sdpa_bwd);
                    cx.free(g_y);
                    cx.sim.free_all(&a.tensors());
                    cx.free(qkv);
                    kernel(cx, &[Some(dq), Some(dk), Some(dv)]);
                    let cat = alloc_as(cx, 3 * nc * p, p, Temporary, "cat");
                    cx.sim.free_all(&[dq, dk, dv]);
                    cat
                }
                CoreSaved::Manual {
                    qkv,
                    scores,
                    probs,
                    stats,
                    mask,
                    y: _,
                } => {
                    let s_elems = ops::manual_scores_elems(cx);
                    let g_v = mm(cx, nc * p, p, Temporary, "bmm");
                    cx.free(g_y);
                    // One fused kernel from the output's gradient to the scores' (bmm backward, dropout,
                    // softmax): a single T x T transient, allocated once the saved scores are released
                    // (measured order).
                    cx.sim.free_some(&[scores]);
                    let g_scores = alloc_as(cx, s_elems * p, p, Temporary, "softmax_backward");
                    let g_q = mm(cx, nc * p, p, Temporary, "bmm");
                    let g_k = mm(cx, nc * p, p, Temporary, "bmm");
                    cx.free(g_scores);
                    cx.sim.free_some(&[mask]);
                    cx.sim
                        .free_all(&[probs, stats[0], stats[1], qkv[0], qkv[1], qkv[2]]);
                    let cat = alloc_as(cx, 3 * nc * p, p, Temporary, "cat");
                    cx.sim.free_all(&[g_q, g_k, g_v]);
                    cat
                }
            };
            let g_in = linear_bwd(
                cx,
                (3 * c, c),
                qkv_bias,
                [Some(g_qkv), None],
                &[norm_out],
                w_attn,
                pending,
            );
            cx.free(g_qkv);
            vec![g_in]
        }
        Attn::Separate {
            q_rot,
            k_rot,
            v,
            core,
            casts: [w_q, w_k, w_v, w_o],
            qk_norm,
            y_t: _,
        } => {
            let kv = cx.m.kv_dim();
            let (dq, dk, mut dv, repeated) = match core {
                SeparateCore::Sdpa { saved, masked } => {
                    let g_o = linear_bwd(cx, (c, qd), bias, [None, None], &[], w_o, pending);
                    release_low(cx, g);
                    let (dq, dk, dv) = if masked {
                        extern_kernel(cx, |cx| ops::sdpa_bwd_with(cx, SdpaBackend::Efficient, qd))
                    } else {
                        extern_kernel(cx, ops::sdpa_bwd)
                    };
                    cx.free(g_o);
                    cx.sim.free_all(&[q_rot, k_rot]);
                    cx.sim.free_all(&saved.tensors());
                    cx.free(v);
                    (dq, dk, dv, masked)
                }
                SeparateCore::Eager(e) => {
                    let g_o =
                        linear_bwd(cx, (c, qd), bias, [None, None], &[Some(e.y)], w_o, pending);
                    release_low(cx, g);
                    let (dq, dk, dv) = eager_core_bwd(cx, e, g_o, [q_rot, k_rot, v]);
                    (dq, dk, dv, true)
                }
            };
            if cx.arch.qkv == Qkv::PackedSlices {
                // Rotary's backward for k, then q; one kernel places the three gradients into the packed width,
                // read by one Linear backward (wrapper of `phi3-512-untied-bf16amp-compiled`).
                let dk_un = rotary_bwd(cx, kv, None, pending);
                cx.free(dk);
                let dq_un = rotary_bwd(cx, qd, None, pending);
                cx.free(dq);
                let g_qkv = alloc_as(cx, cx.n * (qd + 2 * kv) * p, p, Temporary, "slice_backward");
                cx.sim.free_all(&[dv, dk_un, dq_un]);
                let g_in = linear_bwd(
                    cx,
                    (qd + 2 * kv, c),
                    qkv_bias,
                    [None, None],
                    &[norm_out],
                    w_q,
                    pending,
                );
                cx.free(g_qkv);
                return vec![g_in];
            }
            if repeated && kv < qd {
                // The repeat's backward: v's gradient summed over the heads sharing each KV head (k's is summed
                // in rotary's backward kernel).
                let summed = alloc_as(cx, cx.n * kv * p, p, Temporary, "sum (repeat_kv backward)");
                cx.free(dv);
                dv = summed;
            }
            let g_v = linear_bwd(cx, (kv, c), qkv_bias, [None, None], &[], w_v, pending);
            cx.free(dv);
            let (q_saved, k_saved) = match qk_norm {
                Some(n) => (Some((n.q, n.q_stat)), Some((n.k, n.k_stat))),
                None => (None, None),
            };
            let dk_un = rotary_bwd(cx, kv, k_saved, pending);
            cx.free(dk);
            let g_k = linear_bwd(cx, (kv, c), qkv_bias, [None, None], &[], w_k, pending);
            cx.free(dk_un);
            let dq_un = rotary_bwd(cx, qd, q_saved, pending);
            cx.free(dq);
            let g_q = linear_bwd(
                cx,
                (qd, c),
                qkv_bias,
                [None, None],
                &[norm_out],
                w_q,
                pending,
            );
            cx.free(dq_un);
            vec![g_v, g_k, g_q]
        }
    }
}
/// HF's eager attention core backward, entering with o_proj's input gradient `g_o`: its head-major copy (`g_o`
/// dies), v's gradient (probabilities^T @ g; the probabilities die), the probabilities' gradient (g @ v^T, B x H x
/// T x T; v's repeat dies), which the softmax's (and a soft-cap's) backward kernel overwrites with the scores'
/// gradient, releasing what it read (fp32 probabilities, or scores and statistics), then q's and k's gradients
/// (GEMMs with k and q, which die), at q's width (wrapper of `llama-manual-512-gqa-bf16amp-compiled`). Returns
/// (dq, dk, dv), k and v still repeated to every head.
fn eager_core_bwd(
    cx: &mut Ctx,
    e: EagerSaved,
    g_o: Tensor,
    [q_rot, k_rot, v]: [Tensor; 3],
) -> (Tensor, Tensor, Tensor) {
    let (s, p) = (ops::manual_scores_elems(cx), cx.p);
    let nq = cx.n * cx.m.q_dim();
    let g = alloc_as(cx, nq * p, p, Temporary, "clone (transpose backward)");
    cx.free(g_o);
    let dv = mm(cx, nq * p, p, Temporary, "bmm");
    cx.free(e.probs);
    let g_s = mm(cx, s * p, p, Temporary, "bmm");
    cx.free(v);
    cx.sim.free_some(&[e.scores, e.probs32]);
    if let Some(stats) = e.stats {
        cx.sim.free_all(&stats);
    }
    let dk = mm(cx, nq * p, p, Temporary, "bmm");
    cx.free(q_rot);
    let dq = mm(cx, nq * p, p, Temporary, "bmm");
    cx.sim.free_all(&[k_rot, g_s, g]);
    (dq, dk, dv)
}

/// Rotary's backward for q or k (`width` features per token): the gradient of the unrotated projection, in the
/// matmul dtype. With a q/k norm the same kernel runs the norm's backward, reading the saved projection and
/// statistic (released after it) and writing, besides, the fp32 product of the gradient and the normalised input
/// that the norm weight's gradient (one head's width) is reduced from (wrapper of
/// `qwen3-512-hd128-tied-bf16amp-compiled`: an fp32 [B, T, heads, head_dim] buffer per projection; the split
/// reduction's partial sums, under 64 KiB, are left out). The norm weight spans one head, or the whole projection
/// (OLMo 2's; `qk_norm_full`).
fn rotary_bwd(
    cx: &mut Ctx,
    width: u64,
    norm: Option<(Tensor, Tensor)>,
    pending: &mut Vec<Tensor>,
) -> Tensor {
    let Some((x, stat)) = norm else {
        return alloc_as(cx, cx.n * width * cx.p, cx.p, Temporary, "rotary_backward");
    };
    let prod = alloc_as(cx, cx.n * width * 4, 4, Temporary, "rms_norm_backward");
    let g = alloc_as(cx, cx.n * width * cx.p, cx.p, Temporary, "rotary_backward");
    cx.sim.free_all(&[x, stat]);
    let weight = if cx.arch.qk_norm_full {
        width
    } else {
        cx.m.head_dim()
    };
    reduce_grad(cx, &[], weight, pending);
    cx.free(prod);
    g
}

/// A tied LM head's weight gradient as the backward holds it until the embedding's is ready.
enum TiedHead {
    /// Under autocast: the head's weight-gradient matmul runs at once, in the matmul dtype; the sum with the
    /// embedding's (fp32) gradient is a separate kernel at the end.
    Made(Tensor),
    /// fp32 and pure bf16: the pattern passes fuse the matmul with that sum into one `addmm` at the end of the
    /// graph, so its inputs, the loss gradient and the final norm's output, stay alive until then.
    Deferred { g_logits: Tensor, norm_out: Tensor },
}

/// What the loss and LM-head backward leave: the residual gradient entering the last block, and a tied head's
/// weight gradient (or what it will be made from) waiting for the embedding's.
struct HeadBackward {
    g: ResidualGrad,
    tied_head: Option<TiedHead>,
    early: Option<EarlyEmbeddingGrads>,
}

/// nanoGPT with a sequence shorter than the block, under autocast: the position embedding's gradient is then an
/// index-put into a zeroed block_size x C fp32 buffer rather than a sum over the batch, and the wrapper of
/// `grads-dominate-accum3-fp16` makes the zero-fill of both embeddings' fp32 gradient buffers right after the
/// fused loss kernel (both `empty_strided_cuda` calls come before the head's first matmul), so they live through
/// the whole backward. That wrapper ran in BFS order (Inductor's memory-ordering pass: the zero-fills read nothing,
/// so BFS runs them first); in the scheduler's own order they come at the end, as in fp32 and pure bf16 (wrappers
/// of `grads-dominate-accum2` and `grads-dominate-accum2-bf16`) and in the founding case. A described backward
/// (`described_backward`) therefore makes them at the end and lets the pass decide; the others keep this.
struct EarlyEmbeddingGrads {
    wte: Tensor,
    wpe: Tensor,
}

/// The fused loss backward, the LM head and the final norm.
///
/// The compiled forward returns `logits` as a differentiable output whose gradient nobody uses, so before the
/// compiled backward runs the autograd engine materialises a zeros tensor of the logits' shape and dtype for it
/// (`aten.zeros` in the traces; the compiled backward adds it and frees it once read). The loss gradient,
/// softmax - one_hot from the saved logits and row statistics, is then written by one kernel directly in the
/// matmul dtype: with Inductor's pattern passes on (its default) no fp32 N x V gradient exists, nanoGPT's and
/// HF's (`logits.float()`) alike. `release` are the loss's saved tensors. `recompute` runs once the head's
/// matmuls are done and before the final norm's backward: checkpointed, it recomputes the last block, whose
/// output (returned) that backward reads. The final RMSNorm's backward writes the residual gradient over the
/// last block's output, which dies with it (`buf7 = add_112  # reuse`); LayerNorm's reads its saved input after
/// that kernel, so its gradient is new memory.
#[allow(clippy::too_many_arguments)]
fn head_backward(
    cx: &mut Ctx,
    early_embedding_grads: bool,
    (release, logits): (&[Tensor], Tensor),
    head_cast: Option<Tensor>,
    norm_out: Tensor,
    norm_stat: [Option<Tensor>; 2],
    x_last: Option<Tensor>,
    recompute: impl FnOnce(&mut Ctx) -> (Option<Tensor>, Vec<Tensor>),
    pending: &mut Vec<Tensor>,
) -> HeadBackward {
    let (c, p, r) = (cx.m.n_embd, cx.p, cx.r);
    let v = cx.m.vocab_size;
    let zeros = alloc_as(
        cx,
        cx.n * v * p,
        p,
        Logits,
        "zeros (unused gradient of the returned logits)",
    );
    // The autograd engine made that tangent; the compiled backward graph starts here.
    begin_graph(cx);
    cx.sim.fixed_input(zeros);
    let mut reads: Vec<Option<Tensor>> = release.iter().map(|&t| Some(t)).collect();
    reads.extend([Some(zeros), Some(logits)]);
    kernel(cx, &reads);
    let g_logits = alloc_as(
        cx,
        cx.n * padded_vocab(v) * p,
        p,
        Logits,
        "fused cross-entropy backward",
    );
    // Inductor's scheduler realizes the softmax's numerator as a buffer of that size too, read by nothing else
    // and never allocated by the kernel (the founding case's recorded graph: `buf1` of `op0_op1_op2`).
    cx.sim.phantom(cx.n * padded_vocab(v) * p);
    cx.sim.free_all(release);
    cx.free(zeros);
    let early = early_embedding_grads.then(|| {
        let wpe_cat = if cx.pb == 4 {
            grad_category(cx)
        } else {
            Temporary
        };
        kernel(cx, &[]);
        let wte = alloc_as(cx, v * c * 4, 4, Temporary, "embedding_dense_backward");
        kernel(cx, &[]);
        EarlyEmbeddingGrads {
            wte,
            wpe: alloc_as(
                cx,
                cx.m.block_size * c * 4,
                4,
                wpe_cat,
                "embedding_dense_backward",
            ),
        }
    });
    let autocast = cx.prec.autocast();
    // The head's weight gradient: in the matmul dtype, converted to the parameter dtype (autocast) only once the
    // input gradient is made and the loss gradient and the weight cast are released (measured order).
    let mut low_head = None;
    let tied_head = if cx.arch.tied_head && !autocast {
        None
    } else if cx.arch.tied_head {
        kernel(cx, &[Some(g_logits), Some(norm_out)]);
        Some(TiedHead::Made(mm(cx, v * c * p, p, Temporary, "mm")))
    } else {
        low_head = weight_grad(cx, [Some(g_logits), Some(norm_out)], v * c, &[], pending);
        None
    };
    let deferred = cx.arch.tied_head && !autocast;
    if !deferred {
        cx.free(norm_out);
    }
    kernel(cx, &[Some(g_logits), head_cast]);
    let g_norm = mm(cx, cx.n * c * p, p, Temporary, "mm");
    if !deferred {
        cx.free(g_logits);
    }
    cx.sim.free_some(&[head_cast]);
    convert_grad(cx, v * c, low_head, pending);
    let (recomputed, read_last) = recompute(cx);
    let layer_norm = matches!(cx.arch.norm, Norm::LayerNorm { .. });
    let stream = x_last.or(recomputed);
    if !layer_norm {
        norm_grads(cx, &[Some(g_norm), stream], pending);
    }
    let nc = cx.n * c;
    let mut reads = vec![Some(g_norm), stream];
    reads.extend_from_slice(&norm_stat);
    cx.sim.kernel(&reads, stream.filter(|_| layer_norm));
    let wide = match stream {
        Some(x) if !layer_norm => {
            cx.sim.adopt(x);
            x
        }
        _ => alloc_as(cx, nc * r, cx.r, Temporary, "layer_norm_backward"),
    };
    // The 2-byte copy is for the matmuls of the last block's MLP; without a norm before its branches a post-norm's
    // backward reads the residual gradient itself (wrapper of `olmo2-512-untied-bf16amp-compiled`).
    // What the last block's recompute left for this kernel alone dies as it runs; the copy may take its buffer.
    cx.sim.free_all(&read_last);
    let low = (r != p && cx.arch.pre_norms && !moe_reads_wide(cx))
        .then(|| alloc_as(cx, nc * p, p, Temporary, "_to_copy"));
    cx.free(g_norm);
    cx.sim.free_some(&norm_stat);
    if layer_norm {
        cx.sim.free_some(&[stream]);
        norm_grads(cx, &[Some(g_norm), stream], pending);
    }
    let g = ResidualGrad { wide, low };
    cx.sim.next_stage("backward");
    let tied_head = if deferred {
        Some(TiedHead::Deferred { g_logits, norm_out })
    } else {
        tied_head
    };
    HeadBackward {
        g,
        tied_head,
        early,
    }
}

/// The token embedding's gradient: the rows' gradient accumulated in fp32 whatever the dtype (measured: an fp32
/// V x C buffer in fp32, autocast and pure bf16 alike), then summed with a tied head's gradient or, untied,
/// converted to the parameter dtype. A deferred head (fp32, pure bf16) is one `addmm` into a new buffer that
/// reads the embedding's gradient (converted first in pure bf16) and the kept loss gradient and norm output; in pure
/// bf16 it runs through cuBLASLt, with its 1 MiB workspace instead of cuBLAS's.
/// Releases the residual gradient; returns the gradient for `.grad`.
fn embedding_backward(
    cx: &mut Ctx,
    tied_head: Option<TiedHead>,
    g: ResidualGrad,
    early_dense: Option<Tensor>,
    idx: Tensor,
) -> Tensor {
    let vc = cx.m.vocab_size * cx.m.n_embd;
    let cat = grad_category(cx);
    let dense_is_grad = tied_head.is_none() && cx.pb == 4;
    let dense = early_dense.unwrap_or_else(|| {
        kernel(cx, &[]);
        alloc_as(
            cx,
            vc * 4,
            4,
            if dense_is_grad { cat } else { Temporary },
            "embedding_dense_backward",
        )
    });
    // The rows' gradients accumulated into the zero-filled buffer (`index_put`, every recorded backward graph).
    cx.sim
        .kernel_writing(&[Some(g.wide), g.low, Some(idx)], dense);
    release_residual(cx, g);
    match tied_head {
        Some(TiedHead::Deferred { g_logits, norm_out }) => {
            let converted = (cx.pb != 4).then(|| {
                let t = alloc_as(cx, vc * cx.pb, cx.pb, Temporary, "_to_copy");
                cx.free(dense);
                t
            });
            // The addmm adds the (converted) embedding gradient, a 2-D matrix in the parameter dtype: cuBLASLt
            // in pure bf16, cuBLAS in fp32.
            let grad = alloc_as(cx, vc * cx.pb, cx.pb, cat, "addmm");
            cx.addmm_matrix_workspace(cx.pb);
            cx.free(g_logits);
            match converted {
                Some(t) => cx.free(t),
                None => cx.free(dense),
            }
            cx.free(norm_out);
            grad
        }
        _ if dense_is_grad => dense,
        head => {
            let op = if head.is_some() { "add" } else { "_to_copy" };
            let h = match head {
                Some(TiedHead::Made(h)) => Some(h),
                _ => None,
            };
            kernel(cx, &[h, Some(dense)]);
            let grad = alloc_as(cx, vc * cx.pb, cx.pb, cat, op);
            if let Some(TiedHead::Made(h)) = head {
                cx.free(h);
            }
            cx.free(dense);
            grad
        }
    }
}

/// Whether the backward graph's kernels are all described (`Sim::kernel`), so that Inductor's memory-ordering
/// pass can be replayed over it (`Sim::described`): nanoGPT's blocks (`gelu_block`) without dropout or
/// checkpointing, its tied head under autocast.
fn described_backward(cx: &Ctx, f: &Forward) -> bool {
    gelu_block(cx)
        && cx.arch.program == Program::NanoGpt
        && cx.arch.tied_head
        && cx.arch.positions == Positions::Learned
        && !cx.dropout
        && cx.prec.autocast()
        && f.blocks.iter().all(|b| matches!(b, Saved::All(_)))
}

/// Compiled backward of one micro-step: the fused loss backward, the LM head, the blocks in reverse, the
/// embeddings. Returns when the whole backward graph has returned (one call: its outputs, the parameter
/// gradients, exist together before AccumulateGrad takes them).
pub fn backward(cx: &mut Ctx, f: Forward) {
    let c = cx.m.n_embd;
    let orderable = described_backward(cx, &f);
    let mut pending = Vec::new();
    let mut blocks = f.blocks;
    // Checkpointed: the last block's forward runs again before the final norm's backward.
    let mut last = None;
    let mut last_mean = None;
    let recompute = |cx: &mut Ctx| match blocks.pop() {
        Some(Saved::Input(x_in)) if gelu_block(cx) => {
            cx.sim.layer(Some(blocks.len() as u32));
            let r = gelu_block_recompute_last(cx, x_in);
            last = Some(Saved::All(r.block));
            last_mean = Some(r.mean_1);
            cx.sim.layer(None);
            (Some(r.x_out), r.read_last)
        }
        Some(Saved::Input(x_in)) => {
            let l = blocks.len() as u64;
            cx.sim.layer(Some(l as u32));
            let (b, x_out) = block_recompute(cx, x_in, l);
            last = Some(Saved::All(b));
            cx.sim.layer(None);
            (x_out, Vec::new())
        }
        other => {
            last = other;
            (None, Vec::new())
        }
    };
    let learned = cx.arch.positions == Positions::Learned;
    // The loss's saved tensors; nanoGPT's loop keeps the logits themselves (`logits, loss = model(X, Y)`).
    let mut release = vec![f.ce_stats[0], f.ce_stats[1], f.targets];
    if cx.arch.program == Program::HfLoop {
        release.push(f.logits);
    }
    release.extend(f.raw_logits);
    let HeadBackward {
        mut g,
        tied_head,
        early,
    } = head_backward(
        cx,
        learned && cx.t < cx.m.block_size && cx.prec.autocast() && !orderable,
        (&release, f.logits),
        f.head_cast,
        f.norm_f,
        f.norm_f_stats,
        f.x_last,
        recompute,
        &mut pending,
    );
    blocks.extend(last);
    for (l, b) in blocks.into_iter().enumerate().rev() {
        cx.sim.layer(Some(l as u32));
        g = match b {
            Saved::All(b) => {
                let g = block_bwd(cx, g, b, l == 0, &mut pending);
                cx.sim.free_some(&[last_mean.take()]);
                g
            }
            Saved::Input(x_in) if gelu_block(cx) => gelu_block_backward(cx, x_in, g, &mut pending),
            Saved::Input(x_in) => {
                let b = block_recompute(cx, x_in, l as u64).0;
                block_bwd(cx, g, b, l == 0, &mut pending)
            }
        };
    }
    cx.sim.layer(None);
    cx.sim.free_some(&[f.emb_mask, f.window_mask]);
    let mut early_wte = None;
    if learned {
        // Embeddings: the position gradient (summed over the batch), then the token rows'.
        let cat = grad_category(cx);
        kernel(cx, &[Some(g.wide)]);
        let g_pos = alloc_as(cx, cx.t * c * cx.pb, cx.pb, Temporary, "sum");
        // The gradient is a zero-filled buffer (a kernel of its own, reading nothing) that an index-put
        // accumulates into (every recorded backward graph).
        let index_put = |cx: &mut Ctx, into: Tensor| {
            cx.sim.kernel_writing(&[Some(g_pos), f.pos, f.iota], into);
        };
        let wpe = match early {
            // Already zero-filled in fp32; converted to the parameter dtype when that is not fp32.
            Some(e) if cx.pb == 4 => {
                early_wte = Some(e.wte);
                index_put(cx, e.wpe);
                e.wpe
            }
            Some(e) => {
                early_wte = Some(e.wte);
                index_put(cx, e.wpe);
                kernel(cx, &[Some(e.wpe)]);
                let wpe = alloc_as(cx, cx.m.block_size * c * cx.pb, cx.pb, cat, "_to_copy");
                cx.free(e.wpe);
                wpe
            }
            None => {
                kernel(cx, &[]);
                let wpe = alloc_as(
                    cx,
                    cx.m.block_size * c * cx.pb,
                    cx.pb,
                    cat,
                    "embedding_dense_backward",
                );
                index_put(cx, wpe);
                wpe
            }
        };
        cx.free(g_pos);
        cx.sim.free_some(&[f.pos, f.iota]);
        land_grad(cx, wpe, &mut pending);
    }
    cx.sim.fixed_input(f.idx);
    cx.sim.fixed_input(f.loss);
    cx.sim.fixed_input(f.targets);
    let wte = embedding_backward(cx, tied_head, g, early_wte, f.idx);
    cx.sim.free_all(&[f.idx, f.loss]);
    land_grad(cx, wte, &mut pending);
    if orderable {
        cx.sim.described();
    }
    cx.sim.end_graph();
    // AccumulateGrad: later micro-steps add into `.grad` in place and drop the graph's outputs.
    cx.sim.free_all(&pending);
}

/// The attention half of a checkpointed nanoGPT block run again in the backward graph, as both backward
/// wrappers read for `gelu_block_backward` and `gelu_block_recompute_last` run it: ln_1 keeping both statistics
/// (mean first), the QKV GEMM, SDPA, then the output projection, each GEMM after its weight cast.
struct AttnRecompute {
    mean_1: Tensor,
    norm1: NormOut,
    w_attn: Option<Tensor>,
    qkv: Tensor,
    a: ops::SdpaSaved,
    w_proj: Option<Tensor>,
    proj: Tensor,
}

fn gelu_block_attn_recompute(cx: &mut Ctx) -> AttnRecompute {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let p = cx.p;
    let (stat_op, _) = norm_op(cx);
    let mean_1 = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
    let norm1 = norm_fwd(cx, false);
    let w_attn = weight_cast(cx, 3 * c * c);
    let qkv = linear_mm(cx, 3 * nc * p, p, Activations, (cx.arch.qkv_bias, false));
    let a = extern_kernel(cx, ops::sdpa_fwd);
    let w_proj = weight_cast(cx, c * c);
    let proj = linear_mm(cx, nc * p, p, Temporary, (cx.arch.linear_bias, true));
    AttnRecompute {
        mean_1,
        norm1,
        w_attn,
        qkv,
        a,
        w_proj,
        proj,
    }
}

/// A checkpointed nanoGPT block (`gelu_block`) other than the last, run again and differentiated as the backward
/// wrappers of `shakespeare-char-ckpt-compiled` (fp16-amp, dropout) and `gpt-8x512-ckpt-bf16-accum2-compiled`
/// (pure bf16) run it: Inductor schedules each recomputed node just before its first reader, so the MLP's
/// recompute is interleaved with its backward. ln_1 keeps both its statistics (mean and rstd); the stream after
/// attention is made in fp32 (`r` bytes) unless the stream is in the matmul dtype without dropout (then the
/// kernels recompute it), with the attention dropout's fp32 random values beside it. c_proj's forward is not run
/// (the block's output is dead code); its input gradient is computed from fc's output before GELU's output exists:
/// c_proj's input-gradient GEMM, then GELU's output (a new buffer: the only one of the recompute made after a
/// gradient), GELU's backward written over that gradient (fc's output dies), c_proj's weight gradient, then fc's
/// Linear backward (`buf94`, `buf91`, `buf96 = buf94  # reuse`, `buf92`, `buf97`, `buf98` in the wrapper of the
/// first; `buf76`, `buf74`, `buf77`, `buf75`, `buf78`, `buf79` in the second). The attention's backward follows as in
/// an uncheckpointed block (`attn_bwd`).
fn gelu_block_backward(
    cx: &mut Ctx,
    x_in: Tensor,
    g: ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let bias = cx.arch.linear_bias;
    let AttnRecompute {
        mean_1,
        norm1,
        w_attn,
        qkv,
        a,
        w_proj,
        proj,
    } = gelu_block_attn_recompute(cx);
    let x_mid = (r != p || cx.arch.dropout).then(|| alloc_as(cx, nc * r, r, Activations, "add"));
    let mask = residual_mask(cx, nc, true);
    let norm2 = norm_fwd(cx, true);
    cx.free(proj);
    let w_fc = weight_cast(cx, i * c);
    let h = linear_mm(cx, cx.n * i * p, p, Activations, (bias, false));
    let mut g = g;
    // c_proj's input gradient, then GELU's output; GELU's backward writes fc's output gradient over the first.
    let w_mlp = weight_cast(cx, c * i);
    let g_h = input_grad(cx, None, i, w_mlp);
    let gelu = alloc_as(cx, cx.n * i * p, p, Activations, "gelu");
    cx.free(h);
    let low = weight_grad(cx, [None, None], c * i, &[Some(gelu)], pending);
    release_low(cx, &mut g);
    if bias {
        reduce_grad(cx, &[], c, pending);
    }
    convert_grad(cx, c * i, low, pending);
    let g_in = linear_bwd(
        cx,
        (i, c),
        bias,
        [None, None],
        &[Some(norm2.out)],
        w_fc,
        pending,
    );
    cx.free(g_h);
    let mut g = into_residual(
        cx,
        vec![g_in],
        (Some(norm2.stat), x_mid),
        (g, true),
        pending,
    );
    let attn = Attn::Fused {
        w_attn,
        core: CoreSaved::Sdpa(a, qkv),
        w_proj,
    };
    let grads = attn_bwd(cx, attn, mask, Some(norm1.out), &mut g, pending);
    cx.free(mean_1);
    into_residual(
        cx,
        grads,
        (Some(norm1.stat), Some(x_in)),
        (g, true),
        pending,
    )
}

/// The last checkpointed nanoGPT block run again in the backward graph (`gelu_block_recompute_last`).
struct LastRecompute {
    /// What its backward reads, for `block_bwd`.
    block: Block,
    /// ln_1's second statistic (the recompute keeps mean and rstd), released after the block's backward.
    mean_1: Tensor,
    /// The block's output, which the final norm's backward reads.
    x_out: Tensor,
    /// What that backward's kernel reads last: c_proj's output (its 2-byte gradient copy is written over it, `buf37
    /// = buf30  # reuse`) and the MLP dropout's fp32 random values.
    read_last: Vec<Tensor>,
}

/// The last checkpointed nanoGPT block (`gelu_block`) run again between the head's matmuls and the final norm's
/// backward, as the backward wrapper of `shakespeare-char-ckpt-compiled` runs it: the whole block, its output
/// included (the final norm's backward reads it). Against an uncheckpointed block's forward: ln_1 keeps both
/// statistics, the stream after attention, ln_2's statistic, the attention dropout's fp32 random values and ln_2's
/// output come in that order (`buf20`, `buf22`, `buf24`, `buf26`), c_proj's weight cast before fc's, GELU's
/// output is a new buffer, c_proj's output is a buffer of its own (`buf30`) followed by the block's output and the
/// MLP dropout's random values (`buf31`, `buf32`), and the output projection's output dies there.
fn gelu_block_recompute_last(cx: &mut Ctx, x_in: Tensor) -> LastRecompute {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let bias = cx.arch.linear_bias;
    let (stat_op, _) = norm_op(cx);
    let AttnRecompute {
        mean_1,
        norm1,
        w_attn,
        qkv,
        a,
        w_proj,
        proj,
    } = gelu_block_attn_recompute(cx);
    let x_mid = alloc_as(cx, nc * r, r, Activations, "add");
    let stat_2 = alloc_as(cx, cx.n * 4, 4, Activations, stat_op);
    let mask1 = residual_mask(cx, nc, true);
    let out_2 = alloc_as(cx, nc * p, p, Activations, norm_op(cx).1);
    cx.sim.next_kernel_made();
    let w_mlp = weight_cast(cx, c * i);
    let w_fc = weight_cast(cx, i * c);
    let h = linear_mm(cx, cx.n * i * p, p, Activations, (bias, false));
    let gelu = alloc_as(cx, cx.n * i * p, p, Activations, "gelu");
    let out = linear_mm(cx, nc * p, p, Temporary, (bias, true));
    let x_out = alloc_as(cx, nc * r, r, Activations, "add");
    let mask2 = residual_mask(cx, nc, true);
    cx.free(proj);
    let mut read_last = vec![out];
    read_last.extend(mask2);
    let block = Block {
        x_in,
        norm1: Some(norm1),
        mean_1: None,
        attn: Attn::Fused {
            w_attn,
            core: CoreSaved::Sdpa(a, qkv),
            w_proj,
        },
        x_mid: Some(x_mid),
        masks: [mask1, None],
        norm2: Some(NormOut {
            stat: stat_2,
            out: out_2,
        }),
        mlp: MlpSaved::Gelu {
            w_fc,
            h,
            w_mlp,
            g: gelu,
        },
        post: [None, None],
    };
    LastRecompute {
        block,
        mean_1,
        x_out,
        read_last,
    }
}

/// Whether the MLP is a mixture of experts that reads only the fp32 residual gradient (no shared expert, whose
/// matmuls read a 2-byte gradient): the norm's backward before it then writes no 2-byte copy (`moe_bwd`).
fn moe_reads_wide(cx: &Ctx) -> bool {
    matches!(cx.arch.mlp, Mlp::Moe(m) if !m.shared_expert)
}

/// What the compiled mixture of experts saves (`moe_fwd`). N tokens, C width, I expert width, E experts, k experts
/// per token, S = N k token-expert pairs.
struct MoeSaved {
    /// The router's weight cast, and either its logits [N, E] in the matmul dtype (Mixtral's: the backward
    /// recomputes the fp32 softmax from them) or the fp32 softmax itself (the others').
    router_cast: Option<Tensor>,
    logits: Tensor,
    softmax_saved: bool,
    /// The top-k values [N, k] fp32 (with a renormalisation) and expert ids [N, k] int64.
    values: Option<Tensor>,
    ids: Tensor,
    /// The sort's permutation, each pair's token (`// k`), the inverse permutation (int64 [S] each).
    perm: Tensor,
    token_of: Tensor,
    inverse: Tensor,
    /// The pairs' inputs [S, C] and scores [S] (fp32), the expert offsets [E].
    x_pairs: Tensor,
    scores_pairs: Tensor,
    offsets: Tensor,
    /// The experts' outputs (fp32): gate_up [S, 2I], the SiLU product [S, I], down [S, C].
    gate_up: Tensor,
    prod: Tensor,
    down: Tensor,
    shared: Option<SharedExpert>,
}

/// Qwen2-MoE's shared expert as the compiled forward saves it: its SwiGLU's tensors (gate, up, product; weight
/// casts), its output [N, C] (the gate's `mul` backward reads it) and the gate's logit [N, 1] (matmul dtype).
struct SharedExpert {
    out: [Tensor; 3],
    casts: [Option<Tensor>; 3],
    down: Tensor,
    gate: Tensor,
}

impl MoeSaved {
    fn release(self, cx: &mut Ctx) {
        if let Some(sh) = self.shared {
            cx.sim.free_all(&sh.out);
            cx.sim.free_some(&sh.casts);
            cx.sim.free_all(&[sh.down, sh.gate]);
        }
        cx.sim.free_some(&[self.router_cast, self.values]);
        cx.sim.free_all(&[
            self.logits,
            self.ids,
            self.perm,
            self.token_of,
            self.inverse,
            self.x_pairs,
            self.scores_pairs,
            self.offsets,
            self.gate_up,
            self.prod,
            self.down,
        ]);
    }
}

/// `transformers::grouped_mm_fallback` (transformers' custom op, what Dynamo runs when the expert weights are not
/// bf16, so under autocast): its output is one `torch.zeros` [S, `out_f`] in the weights' dtype, then one
/// `torch.mm(..., out=)` per expert with tokens, each taking the cuBLAS workspace (the model takes it once, as a
/// GEMM's). Opaque to Inductor: its output is a buffer of the wrapper.
fn grouped_mm_fallback(cx: &mut Ctx, out_f: u64) -> Tensor {
    let s = cx.n * cx.m.experts_per_token;
    extern_kernel(cx, |cx| {
        mm(
            cx,
            s * out_f * cx.pb,
            cx.pb,
            Activations,
            "grouped_mm_fallback",
        )
    })
}

/// Its backward (`transformers::grouped_mm_fallback_backward`): `zeros_like` of the input [S, `in_f`], then of the
/// weight [E, `in_f`, `out_f`] (dense whatever the routing: the parameter's `.grad`), then per expert the two
/// GEMMs. Returns the input's gradient; the weight's is landed.
fn grouped_mm_fallback_bwd(
    cx: &mut Ctx,
    (in_f, out_f): (u64, u64),
    pending: &mut Vec<Tensor>,
) -> Tensor {
    let s = cx.n * cx.m.experts_per_token;
    let cat = grad_category(cx);
    let (g_in, g_w) = extern_kernel(cx, |cx| {
        let g_in = alloc_as(
            cx,
            s * in_f * cx.pb,
            cx.pb,
            Temporary,
            "grouped_mm_fallback_backward",
        );
        let g_w = alloc_as(
            cx,
            cx.m.n_experts * in_f * out_f * cx.pb,
            cx.pb,
            cat,
            "grouped_mm_fallback_backward",
        );
        (g_in, g_w)
    });
    cx.matmul_workspace();
    land_grad(cx, g_w, pending);
    g_in
}

/// The mixture of experts on the second norm's output, as the forward wrappers of the three compiled MoE records
/// allocate it (`mixtral-256-e4top2-bf16amp-compiled`, `qwen2moe-256-e8top2-shared-gqa-bf16amp-compiled`,
/// `olmoe-256-e8top2-bf16amp-compiled`; torch 2.15, transformers 5.24, bf16-amp: fp32 expert weights, so the
/// experts run through `grouped_mm_fallback`): Qwen2-MoE's shared expert first (Llama's SwiGLU, its output
/// saved), the router's weight cast and GEMM, the fp32 softmax (Mixtral saves the bf16 logits and the backward
/// recomputes the softmax; the others save the softmax and not the logits), top-k (the fp32 values saved where a
/// renormalisation reads them, the ids saved), the sort of the pairs by expert (sorted ids a temporary, the
/// permutation saved), each pair's token and the inverse permutation (int64 [S], saved), the pairs' inputs
/// gathered in fp32 [S, C] (the norm recomputed in the gather's kernel), the ids cast to int32 for `histc` and the
/// offsets (`cumsum` over the histogram, in place), then the experts: gate_up [S, 2I], the SiLU product [S, I] in
/// one kernel, down [S, C], all fp32 and saved, and the pairs' scores [S] (fp32 for Mixtral, whose routing
/// weights stay fp32; the matmul dtype otherwise); Qwen2-MoE's shared-expert gate last. The scatter back (scores
/// times down, summed over each token's k pairs) is fused with the residual add and the next norm: no [S, C] or
/// [N, C] buffer of it exists.
fn moe_fwd(cx: &mut Ctx, moe: crate::arch::Moe) -> MoeSaved {
    let (n, c, i) = (cx.n, cx.m.n_embd, cx.m.intermediate_size);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let s = n * k;
    let nc = n * c;
    let shared = moe.shared_expert.then(|| {
        let w = cx.m.shared_expert_size;
        let w_gate = weight_cast(cx, w * c);
        let gate = mm(cx, n * w * cx.p, cx.p, Activations, "mm");
        let w_up = weight_cast(cx, w * c);
        let up = mm(cx, n * w * cx.p, cx.p, Activations, "mm");
        let prod = alloc_as(cx, n * w * cx.p, cx.p, Activations, "silu_mul");
        let w_down = weight_cast(cx, c * w);
        let down = mm(cx, nc * cx.p, cx.p, Activations, "mm");
        ([gate, up, prod], [w_gate, w_up, w_down], down)
    });
    let router_cast = weight_cast(cx, e * c);
    let softmax_saved = !moe.scores_fp32;
    let (logits_cat, softmax_cat) = if softmax_saved {
        (Temporary, Activations)
    } else {
        (Activations, Temporary)
    };
    let logits = mm(cx, n * e * cx.p, cx.p, logits_cat, "mm");
    let softmax = alloc_as(cx, n * e * 4, 4, softmax_cat, "_softmax");
    let values = alloc_as(cx, n * k * 4, 4, Activations, "topk");
    let ids = alloc_as(cx, s * 8, 8, Activations, "topk");
    let logits = if softmax_saved {
        cx.free(logits);
        softmax
    } else {
        cx.free(softmax);
        logits
    };
    let sorted = alloc_as(cx, s * 8, 8, Temporary, "sort");
    let perm = alloc_as(cx, s * 8, 8, Activations, "sort");
    let inverse = alloc_as(cx, s * 8, 8, Activations, "index_put");
    let token_of = alloc_as(cx, s * 8, 8, Activations, "floor_divide");
    let x_pairs = alloc_as(cx, s * c * 4, 4, Activations, "index");
    let ids32 = alloc_as(cx, s * 4, 4, Temporary, "_to_copy");
    let offsets = alloc_as(cx, e * 4, 4, Activations, "histc");
    cx.free(ids32);
    let gate_up = grouped_mm_fallback(cx, 2 * i);
    let prod = alloc_as(cx, s * i * cx.pb, cx.pb, Activations, "silu_mul");
    let down = grouped_mm_fallback(cx, c);
    let scores_pairs = alloc_as(
        cx,
        s * if moe.scores_fp32 { 4 } else { cx.p },
        if moe.scores_fp32 { 4 } else { cx.p },
        Activations,
        "index",
    );
    cx.free(sorted);
    // The top-k values are saved for the renormalisation's backward; without one (OLMoE's) they die once the
    // pairs' scores are gathered.
    let values = if moe.renorm {
        Some(values)
    } else {
        cx.free(values);
        None
    };
    // Qwen2-MoE: the shared expert's gate, a C -> 1 Linear (its weight cast dies at once; its logit is saved).
    let shared = shared.map(|(out, casts, down)| {
        let w = weight_cast(cx, c);
        let gate = mm(cx, n * cx.p, cx.p, Activations, "mm");
        cx.sim.free_some(&[w]);
        SharedExpert {
            out,
            casts,
            down,
            gate,
        }
    });
    MoeSaved {
        router_cast,
        logits,
        softmax_saved,
        shared,
        values,
        ids,
        perm,
        token_of,
        inverse,
        x_pairs,
        scores_pairs,
        offsets,
        gate_up,
        prod,
        down,
    }
}

/// The mixture of experts' backward, in the order of the backward wrappers of the three records, entering with the
/// fp32 residual gradient (no 2-byte copy: nothing of the experts reads one; Qwen2-MoE's shared expert does, and
/// its gate's backward comes first): the gradient of the scattered pairs [S, C] fp32 (`index_put` into zeros, one
/// kernel) and of the pairs' scores [S]; down's output gradient (times the scores) [S, C]; down's backward (its
/// input gradient [S, I], its dense weight gradient [E, I, C], both fp32); the SiLU product's backward into one
/// [S, 2I] buffer; gate_up's backward (input gradient [S, C], weight gradient [E, C, 2I]); the pairs' inputs
/// summed back to the tokens [N, C] fp32; the top-k scatter [N, E] fp32 (the renormalisation's backward in its
/// kernel), Mixtral's softmax recomputed [N, E] fp32, the softmax's backward cast to the matmul dtype [N, E]; then
/// the router's Linear backward (and Qwen2-MoE's shared expert's SwiGLU backward). Returns the gradients of the
/// norm's output (the experts' in fp32, the Linears' in the matmul dtype), which the norm's backward reads.
fn moe_bwd(
    cx: &mut Ctx,
    m: MoeSaved,
    norm_out: Option<Tensor>,
    g: &mut ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> Vec<Tensor> {
    let (n, c, i) = (cx.n, cx.m.n_embd, cx.m.intermediate_size);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let s = n * k;
    let mut m = m;
    // Qwen2-MoE: the residual gradient's 2-byte copy is the shared expert's output gradient (times the gate's
    // sigmoid), written with the gate logit's gradient [N, 1] by the norm's backward kernel; the gate's weight
    // gradient, then its conversion (its input gradient, an outer product, is in the norm's next kernel).
    let shared = m.shared.take().map(|sh| {
        let g_gate = alloc_as(cx, n * cx.p, cx.p, Temporary, "sigmoid_backward");
        cx.sim.free_all(&[sh.down, sh.gate]);
        let low = weight_grad(cx, [None, None], c, &[], pending);
        convert_grad(cx, c, low, pending);
        (sh.out, sh.casts, g_gate)
    });
    if shared.is_none() {
        release_low(cx, g);
    }
    let g_pairs = alloc_as(cx, s * c * 4, 4, Temporary, "index_put");
    let p_scores = if m.softmax_saved { cx.p } else { 4 };
    let g_scores = alloc_as(cx, s * p_scores, p_scores, Temporary, "index_put");
    let g_down = alloc_as(cx, s * c * cx.pb, cx.pb, Temporary, "mul");
    cx.sim.free_all(&[g_pairs, m.down, m.scores_pairs]);
    let g_prod = grouped_mm_fallback_bwd(cx, (i, c), pending);
    cx.sim.free_all(&[m.prod, g_down]);
    let g_gate_up = alloc_as(cx, s * 2 * i * cx.pb, cx.pb, Temporary, "silu_mul_backward");
    cx.sim.free_all(&[g_prod, m.gate_up]);
    let g_x_pairs = grouped_mm_fallback_bwd(cx, (c, 2 * i), pending);
    cx.sim.free_all(&[m.x_pairs, m.offsets, g_gate_up]);
    let g_x = alloc_as(cx, n * c * 4, 4, Temporary, "index_put");
    cx.sim.free_all(&[g_x_pairs, m.token_of, m.perm, m.inverse]);
    let scattered = alloc_as(cx, n * e * 4, 4, Temporary, "scatter");
    cx.sim.free_some(&[m.values]);
    cx.sim.free_all(&[m.ids, g_scores]);
    let softmax = (!m.softmax_saved).then(|| alloc_as(cx, n * e * 4, 4, Temporary, "_softmax"));
    let g_logits = alloc_as(cx, n * e * cx.p, cx.p, Temporary, "_softmax_backward_data");
    cx.sim
        .free_some(&[Some(scattered), softmax, Some(m.logits)]);
    let Some((out, casts, g_gate)) = shared else {
        let g_router = linear_bwd(
            cx,
            (e, c),
            false,
            [None, None],
            &[norm_out],
            m.router_cast,
            pending,
        );
        cx.free(g_logits);
        return vec![g_x, g_router];
    };
    // The shared expert's SwiGLU backward after the router's (the last to read the norm's output), then the
    // norm's input gradients summed into one fp32 [N, C] buffer, which its weight's reduction reads.
    let g_router = linear_bwd(cx, (e, c), false, [None, None], &[], m.router_cast, pending);
    cx.free(g_logits);
    let width = cx.m.shared_expert_size;
    let mut grads = swiglu_bwd(cx, (out, casts), width, norm_out, g, pending);
    let sum = alloc_as(cx, n * c * 4, 4, Temporary, "add");
    grads.extend([g_x, g_router, g_gate]);
    grads.push(sum);
    grads
}
