//! A training run as PyTorch executes it: the model built on the device, then three full steps (step 1
//! creates the optimizer state; steps 2 and 3 are the steady state), each made of micro-steps (forward,
//! loss, backward), gradient clipping, the optimizer step and `zero_grad(set_to_none=True)`. Under
//! `torch.compile` the micro-step is `compiled`'s (forward and backward graphs); the loop around it is the same.

use crate::arch::Program;
use crate::compiled;
use crate::distributed;
use crate::eager;
use crate::finetune::{LoraConfig, Quantization};
use crate::model::Setup;
use crate::parallel::Strategy;
use crate::policy::{Optimizer, Precision};
use crate::sim::Category::{Adapters, Optimizer as OptState, QuantizedWeights, Temporary, Weights};
use crate::sim::{allocator_capacity, block_bytes, Sim, Tensor};
use crate::tensors::Ctx;
use crate::Error;

/// Steps simulated for every estimate: `max_memory_allocated()` after a few steps is the larger of step 1 and
/// the steady state; three steps show the steady state twice (the measurements ran three). Step 3 starts from
/// the same live set as step 2 and repeats its allocations exactly (`tests::step_three_repeats_step_two`), but
/// not the caching allocator's layout, which can still drift and reserve more in step 3 (the gpt2-large preset:
/// 15,218 MiB reserved after two steps, 15,464 MiB after three), so peak-only estimates run all three too.
pub const N_STEPS: u32 = 3;

/// Runs the whole timeline and returns the allocator's record of it.
///
/// # Errors
/// `NotModelled` for a combination the op models do not cover.
pub fn simulate(setup: &Setup) -> Result<Sim, Error> {
    run(setup, N_STEPS, false, u64::MAX)
}

/// `simulate`, stopped after the micro-step or optimizer stage in which the allocator's peak reserved memory
/// passes `reserved_limit`, and no longer replaying the allocator from the allocation that passes it: the rest
/// could only add to it (for a yes-or-no fit).
///
/// # Errors
/// As `simulate`.
pub fn simulate_within(setup: &Setup, reserved_limit: u64) -> Result<Sim, Error> {
    run(setup, N_STEPS, false, reserved_limit)
}

/// `simulate`, optionally recording every allocator event (see `Sim::events`).
///
/// # Errors
/// As `simulate`.
pub fn simulate_recording(setup: &Setup, record: bool) -> Result<Sim, Error> {
    run(setup, N_STEPS, record, u64::MAX)
}

/// An empty timeline for the setup: the allocator configured by its `PYTORCH_CUDA_ALLOC_CONF`
/// (`train.alloc_conf`), on the setup's device.
fn new_sim(setup: &Setup) -> Sim {
    // What cudaMalloc can have: the device's memory less the CUDA context, which the driver took first
    // (`model::cuda_context_bytes`). A setup fits when the allocator serves every request within it.
    let capacity = allocator_capacity(
        setup.device.memory_bytes,
        crate::model::cuda_context_bytes(setup.device.sm),
    );
    Sim::new(setup.train.alloc_conf, capacity)
}

fn run(setup: &Setup, n_steps: u32, record: bool, reserved_limit: u64) -> Result<Sim, Error> {
    let mut sim = new_sim(setup);
    if record {
        sim.record_events();
    }
    sim.stop_replay_above(reserved_limit);
    // FSDP's mixed precision computes in its param_dtype; one GPU and DDP run the setup as given.
    let exec = distributed::compute_setup(setup);
    let mut cx = Ctx::new(&mut sim, &exec)?;
    let tr = &setup.train;
    // The model as one GPU holds it (under tensor parallelism its share: `compute_setup`).
    let params = cx.arch.param_tensors(&exec.model);
    // A parameter the tensor-parallel plan shards is smaller on one GPU than in the model.
    let tp_sharded: Vec<bool> = cx
        .arch
        .param_tensors(&setup.model)
        .iter()
        .zip(&params)
        .map(|(whole, local)| whole.0 != local.0)
        .collect();
    // The parameters' own dtype (FSDP's sharded parameters and optimizer state keep it under mixed precision).
    let own_pb = tr.precision.param_bytes();
    let mut ddp = None;
    let opt_params: Vec<Param> = if distributed::strategy(setup) == Strategy::Fsdp {
        // Under LoRA the sharded base keeps the base's dtype and the adapters theirs (fp32 under autocast).
        let (own, adapter_own) = match tr.lora {
            Some(_) => (
                crate::finetune::base_bytes(setup),
                crate::finetune::adapter_bytes(tr.precision),
            ),
            None => (own_pb, own_pb),
        };
        let f = distributed::Fsdp::build(&mut cx, &exec, own, adapter_own);
        for bytes in cx.arch.buffers_bytes(&exec.model, own_pb) {
            cx.alloc(bytes, Weights, "buffer");
        }
        let opt = f.optimizer_params(&cx);
        cx.fsdp = Some(Box::new(f));
        // A tensor-parallel plan shards only base parameters (LoRA with tensor parallelism is refused).
        opt.into_iter()
            .zip(tp_sharded.iter().chain(std::iter::repeat(&false)))
            .map(|((elems, matrix, bytes, rows), &tp_sharded)| Param {
                elems,
                matrix,
                bytes,
                rows: if tr.lora.is_some() { rows } else { 0 },
                tp_sharded,
            })
            .collect()
    } else {
        // Weights and buffers, one block each, in the parameter dtype, in the order the constructor makes them
        // (built directly on the device, as the reference runs are).
        match tr.quantization {
            Some(q) => quantized_base(&mut cx, setup, q),
            None if tr.parallel.init_on_device => tp_parallelized(&mut cx, setup, &exec),
            None => {
                let weights: Vec<Tensor> = params
                    .iter()
                    .map(|&(elems, _)| cx.alloc(elems * cx.pb, Weights, "parameter"))
                    .collect();
                for bytes in cx.arch.buffers_bytes(&exec.model, cx.pb) {
                    cx.alloc(bytes, Weights, "buffer");
                }
                tie_head(&mut cx, &exec, weights[0]);
            }
        }
        let trained: Vec<Param> = match &tr.lora {
            None => params
                .iter()
                .zip(&tp_sharded)
                .map(|(&(elems, matrix), &tp_sharded)| Param {
                    elems,
                    matrix,
                    bytes: cx.pb,
                    rows: 0,
                    tp_sharded,
                })
                .collect(),
            Some(lora) => lora_params(&mut cx, setup, lora),
        };
        if distributed::strategy(setup) == Strategy::Ddp {
            // `_sync_module_states` broadcasts every parameter, frozen or not; the reducer's buckets hold the
            // trained ones (a LoRA model's adapters).
            let mut states: Vec<(u64, u64)> = params.iter().map(|p| (p.0 * cx.pb, cx.pb)).collect();
            if tr.lora.is_some() {
                states.extend(trained.iter().map(|p| (p.elems * p.bytes, p.bytes)));
            }
            let buckets: Vec<u64> = trained.iter().map(|p| p.elems * p.bytes).collect();
            ddp = Some(distributed::Ddp::build(
                &mut cx,
                &states,
                &buckets,
                &tr.parallel,
            ));
        }
        trained
    };
    let mut state: Vec<Tensor> = Vec::new();
    let mut loop_state = Loop::start(&mut cx);
    loop_state.ddp = ddp;
    let over = |cx: &Ctx| cx.sim.allocator().peak_reserved_bytes() > reserved_limit;
    'steps: for step in 1..=n_steps {
        let n_micro = simulated_micro_steps(tr.grad_accum_steps);
        for micro in 0..n_micro {
            // Gradient sync (DDP's `no_sync()` / `require_backward_grad_sync`, FSDP's
            // `set_requires_gradient_sync`) on the last micro-step only, as nanoGPT and the HF loops do.
            loop_state.sync = micro + 1 == n_micro;
            loop_state.micro_step(&mut cx, setup, step);
            if over(&cx) {
                break 'steps;
            }
        }
        // Under FSDP the optimizer steps on the sharded parameters, whose state is in their own dtype.
        let compute_pb = cx.pb;
        cx.pb = own_pb;
        if let Some(f) = cx.fsdp.as_mut() {
            let sharded = std::mem::take(&mut f.sharded_grads);
            cx.grads.extend(sharded);
        }
        optimizer_stage(&mut cx, step, setup, &opt_params, &mut state);
        cx.pb = compute_pb;
        if tr.zero_grad_set_to_none {
            if let Some(f) = cx.fsdp.as_mut() {
                f.grads_released();
            }
        }
        if over(&cx) {
            break;
        }
    }
    Ok(sim)
}

/// A quantized base as transformers' bitsandbytes loading and peft leave it (tests/data/finetune/README.md,
/// quantized bases): the model, built on the host in `train.base_dtype` (bf16 unless given), moved to the device
/// in module order, each parameter in turn (a tied head is the embedding: nothing of its own); a decoder Linear's
/// weight (every matrix but the embedding and the head) arrives as a 2-byte copy, which bitsandbytes quantizes
/// and lets go: `Params4bit` into `finetune::linear4bit_tensors`, `Int8Params` into `finetune::int8_tensors`
/// (its copy is fp16: `B.contiguous().to(device, float16)`). Then `prepare_model_for_kbit_training` casts every
/// other fp16 or bf16 parameter to fp32, one by one (a new tensor, the old one freed), and empties the cache.
fn quantized_base(cx: &mut Ctx, setup: &Setup, q: Quantization) {
    let params = cx.arch.param_shapes(&setup.model);
    let linear = cx.arch.linear_weights(&setup.model);
    let loaded = setup.train.base_dtype.map_or(2, |d| d.bytes());
    let (last, tied) = (params.len().saturating_sub(1), cx.arch.tied_head);
    // A mixture of experts' router and fused experts are no `nn.Linear`: loaded in the base dtype, then fp32.
    let quantized = |i: usize, matrix: bool| matrix && linear[i] && i != 0 && (tied || i != last);
    let mut rest = Vec::new();
    for (i, &(elems, matrix, rows)) in params.iter().enumerate() {
        if quantized(i, matrix) {
            let copy = cx.alloc(elems * 2, Temporary, "_to_copy");
            let (tensors, op) = match q {
                Quantization::Int8 => (
                    crate::finetune::int8_tensors(elems, rows),
                    "int8_vectorwise_quant",
                ),
                _ => (
                    crate::finetune::linear4bit_tensors(elems, q.double_quant()),
                    "quantize_4bit",
                ),
            };
            for bytes in tensors {
                cx.alloc(bytes, QuantizedWeights, op);
            }
            cx.free(copy);
        } else {
            rest.push((elems, cx.alloc(elems * loaded, Weights, "parameter")));
        }
    }
    if loaded != 4 {
        for (elems, t) in rest {
            cx.alloc(elems * 4, Weights, "_to_copy");
            cx.free(t);
        }
    }
    // peft 0.21.2 then empties the allocator's cache (`auto_clear_cache=True`, its default: `utils/other.py`),
    // which hands the segments the quantizing copies and the casts left empty back to the device (stub-cuda
    // snapshot of phi3-qlora-nf4-dq-r16-all-ckpt: three `segment_free`, 20, 32 and 32 MiB, from `empty_cache`
    // in `prepare_model_for_kbit_training`, before peft makes the adapters).
    cx.sim.empty_cache();
}

/// Tensor parallelism without FSDP, as the reference runs build it (and PyTorch's tensor-parallel tutorial):
/// the whole model on the device (`setup`'s parameters, each in full, and its buffers), then
/// `parallelize_module` on each block, then on the root (sequence parallel's embedding and head), each plan's
/// Linears in module order. Each parameter the plan shards is replaced by `distribute_tensor`'s local shard
/// (stub-cuda snapshots of llama-tp4 and llama-tp4-sp, `torch.distributed.tensor.placement_types`): on dim 0
/// (`ColwiseParallel`'s weights and biases, `RowwiseParallel`'s embedding on the vocabulary) `_shard_tensor`
/// copies this GPU's chunk (`empty_strided`) and the full parameter is freed; on dim 1 (`RowwiseParallel`'s
/// Linear weight) `_split_tensor_helper` first makes every GPU's chunk contiguous (`tp` copies of the shard's
/// size), `_shard_tensor` copies this GPU's, the chunks are freed, then the full parameter. The full parameters'
/// blocks stay cached in the allocator, where the step's activations later take them (the reserved memory the
/// records measure: the same model with its shards made directly reserves 52 MiB less at tp 4). Replicated
/// parameters (norms, plan basic's embedding and head) stay as built.
fn tp_parallelized(cx: &mut Ctx, setup: &Setup, exec: &Setup) {
    let whole = cx.arch.param_shapes(&setup.model);
    let local = cx.arch.param_shapes(&exec.model);
    let full: Vec<Tensor> = whole
        .iter()
        .map(|&(elems, _, _)| cx.alloc(elems * cx.pb, Weights, "parameter"))
        .collect();
    for bytes in cx.arch.buffers_bytes(&setup.model, cx.pb) {
        cx.alloc(bytes, Weights, "buffer");
    }
    tie_head(cx, setup, full[0]);
    // The blocks' parameters follow the embeddings; the final norm and an untied head follow the blocks.
    let n_before = usize::from(cx.arch.positions == crate::arch::Positions::Learned) + 1;
    let mut zero = setup.model.clone();
    zero.n_layer = 0;
    let blocks_end = whole.len() - (cx.arch.param_shapes(&zero).len() - n_before);
    let order = (n_before..blocks_end)
        .chain(0..n_before)
        .chain(blocks_end..whole.len());
    let tp = setup.train.parallel.tp;
    for i in order {
        let ((elems, _, rows), (local_elems, _, local_rows)) = (whole[i], local[i]);
        if local_elems == elems {
            continue;
        }
        let bytes = local_elems * cx.pb;
        let chunks: Vec<Tensor> = if local_rows == rows {
            (0..tp)
                .map(|_| cx.alloc(bytes, Temporary, "clone"))
                .collect()
        } else {
            Vec::new()
        };
        cx.alloc(bytes, Weights, "_shard_tensor");
        cx.sim.free_all(&chunks);
        cx.free(full[i]);
    }
}

/// A tied LM head is built with a weight of its own, last, and tying then lets one of the two V x C weights go:
/// the allocator caches that block, and later activations are carved from it. nanoGPT's
/// `self.wte.weight = self.lm_head.weight` drops the embedding's first weight (`embedding`); Hugging Face's
/// `tie_weights` drops the head's own. Both show in the stub-cuda memory snapshots of `nanogpt-30m-b4` and
/// `llama-3.2-1b-tied` (a V x C alloc after the final norm, then the free of the embedding's, resp. the head's).
fn tie_head(cx: &mut Ctx, setup: &Setup, embedding: Tensor) {
    let m = &setup.model;
    if !cx.arch.tied_head {
        return;
    }
    let head = cx.alloc(m.vocab_size * m.n_embd * cx.pb, Weights, "parameter");
    cx.free(match cx.arch.program {
        Program::NanoGpt => embedding,
        Program::HfLoop => head,
    });
}

/// Micro-steps worth simulating: the first of a step creates `.grad`; every later one starts from the same live
/// set (grads present, the previous logits bound) and accumulates in place, so it repeats the second exactly
/// (see `tests::later_micro_steps_repeat_the_second`). This keeps the run bounded for any accumulation count.
fn simulated_micro_steps(grad_accum_steps: u64) -> u64 {
    grad_accum_steps.min(2)
}

/// The model on the device and the first forward (with its loss) only: for per-block figures.
///
/// # Errors
/// As `simulate`.
pub fn simulate_first_forward(setup: &Setup) -> Result<Sim, Error> {
    let mut sim = Sim::counting_only();
    let exec = distributed::compute_setup(setup);
    let mut cx = Ctx::new(&mut sim, &exec)?;
    let tr = &setup.train;
    cx.sim.stage(1, "forward");
    let (x, y) = eager::get_batch(&mut cx);
    if tr.compile {
        let _ = compiled::forward(&mut cx, x, y, tr.checkpointing);
    } else {
        let _ = eager::forward(&mut cx, x, y, tr.checkpointing);
    }
    Ok(sim)
}

/// A forward's saved state, for the backward of the same mode.
enum Pass {
    /// Boxed, both: each forward's saved state is large beside the other's pointer (clippy's
    /// large_enum_variant); one per micro-step.
    Eager(Box<eager::Forward>),
    Compiled(Box<compiled::Forward>),
}

/// What the training loop keeps between micro-steps.
struct Loop {
    /// nanoGPT train.py: the next X, Y, fetched while the current step's graph is alive.
    batch: Option<(Tensor, Tensor)>,
    /// nanoGPT train.py: `logits` stays bound from one micro-step to the next.
    logits: Option<Tensor>,
    scaler_created: bool,
    /// DDP's buckets, when the model is wrapped in it.
    ddp: Option<distributed::Ddp>,
    /// Whether this micro-step's backward synchronises gradients across GPUs.
    sync: bool,
}

impl Loop {
    fn start(cx: &mut Ctx) -> Loop {
        // nanoGPT fetches the first batch before the loop; the Hugging Face loop fetches inside it.
        let batch = (cx.arch.program == Program::NanoGpt).then(|| eager::get_batch(cx));
        Loop {
            batch,
            logits: None,
            scaler_created: false,
            ddp: None,
            sync: true,
        }
    }

    /// One micro-step: forward with the loss, autocast's exit, backward (gradients accumulate into `.grad`).
    fn micro_step(&mut self, cx: &mut Ctx, setup: &Setup, step: u32) {
        let tr = &setup.train;
        let program = cx.arch.program;
        let (x, y) = self.batch.take().unwrap_or_else(|| eager::get_batch(cx));
        cx.sim.stage(step, "forward");
        if let Some(d) = self.ddp.as_mut() {
            d.pre_forward(cx, step);
            cx.ddp_sink_clone = d.sink_clones();
        }
        if let Some(f) = cx.fsdp.as_mut() {
            f.sync = self.sync;
        }
        distributed::root_pre_forward(cx);
        // nanoGPT's `logits, loss = model(X, Y)` rebinds: the previous micro-step's logits die once the forward
        // returns. Leaving eager autocast clears its cast cache.
        let returned = |lp: &mut Loop, cx: &mut Ctx, logits: Option<Tensor>| {
            if let Some(old) = logits.and_then(|l| lp.logits.replace(l)) {
                cx.free(old);
            }
        };
        let f = if tr.compile {
            let f = compiled::forward(cx, x, y, tr.checkpointing);
            let logits = f.returned_logits(cx);
            returned(self, cx, logits);
            Pass::Compiled(Box::new(f))
        } else {
            let mut f = eager::forward(cx, x, y, tr.checkpointing);
            distributed::root_post_forward(cx);
            returned(self, cx, f.logits.take());
            cx.clear_autocast_cache();
            Pass::Eager(Box::new(f))
        };
        // nanoGPT fetches the next batch while the step's graph is alive.
        if program == Program::NanoGpt {
            self.batch = Some(eager::get_batch(cx));
        }
        cx.sim.stage(step, "loss backward");
        self.grad_scaler(cx);
        distributed::root_pre_backward(cx);
        match f {
            Pass::Compiled(f) => compiled::backward(cx, *f),
            Pass::Eager(f) => eager::backward(cx, *f),
        }
        distributed::root_post_backward(cx);
        if let Some(d) = self.ddp.as_mut() {
            d.backward_done();
            cx.ddp_sink_clone = false;
            if self.sync {
                d.post_backward(cx);
            }
        }
        // The HF loop's batch dies with the step (the loss held its own shifted copy of the labels).
        if program == Program::HfLoop {
            cx.free(y);
        }
        // Under FSDP `.grad` of the unsharded parameters outlives the backward only without gradient sync.
        cx.have_grads = cx.fsdp.as_ref().is_none_or(|f| f.unsharded_grads_kept());
    }

    /// GradScaler (fp16-amp): its scale and growth tracker are created on the first `scale(loss)`.
    fn grad_scaler(&mut self, cx: &mut Ctx) {
        if cx.prec == Precision::Fp16Amp && !self.scaler_created {
            self.scaler_created = true;
            cx.alloc(4, OptState, "GradScaler");
            cx.alloc(4, OptState, "GradScaler");
        }
    }
}

/// A trained parameter: elements, whether it is a matrix (nanoGPT's decay group), bytes per element (its
/// gradient and AdamW's state take its dtype).
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub elems: u64,
    pub matrix: bool,
    pub bytes: u64,
    /// The first dimension (Adafactor factors a matrix into rows and columns); 0 when not known.
    pub rows: u64,
    /// Sharded by the tensor-parallel plan (a DTensor on the tp mesh): foreach ops refuse to mix it with the
    /// others, so the optimizer steps the two kinds as groups of their own (measure_parallel.py splits each group
    /// by mesh, in the order the first parameter's kind comes).
    pub tp_sharded: bool,
}

/// What `peft.get_peft_model` adds to the device after the base model, and the parameters it leaves trainable,
/// in `model.parameters()` order (tests/data/finetune/README.md). For each adapted Linear, layer by layer in
/// module order (q, k, v, o, gate, up, down), `update_layer` makes A (`r x in`) and B (`out x r`) and moves them
/// to the base weight's device in its dtype (`_move_adapter_to_device_of_base_layer`); with a 2-byte base,
/// `_cast_adapter_dtype` (`autocast_adapter_dtype=True`) then makes an fp32 copy of each and frees the 2-byte
/// one, module by module. `modules_to_save` deep-copies the head or the embedding (base dtype). Pure bf16 casts
/// the whole PeftModel to bf16 afterwards: each fp32 adapter gets a bf16 copy and is freed.
fn lora_params(cx: &mut Ctx, setup: &Setup, lora: &LoraConfig) -> Vec<Param> {
    let m = &setup.model;
    let pb = cx.pb;
    // (elements, rows, tensor) of each adapter.
    let adapters: Vec<(u64, u64, Tensor)> = crate::finetune::adapter_shapes(m, lora)
        .into_iter()
        .map(|(rows, cols)| {
            let t = cx.alloc(rows * cols * pb, Adapters, "parameter");
            (rows * cols, rows, t)
        })
        .collect();
    let mut adapters = adapters;
    let table = m.vocab_size * m.n_embd;
    if lora.save_embed {
        cx.alloc(table * pb, Adapters, "parameter");
    }
    if lora.save_head {
        cx.alloc(table * pb, Adapters, "parameter");
    }
    if pb != 4 {
        for a in adapters.iter_mut() {
            let wide = cx.alloc(a.0 * 4, Adapters, "_to_copy");
            cx.free(a.2);
            a.2 = wide;
        }
    }
    if cx.ab != 4 {
        for a in adapters.iter_mut() {
            let narrow = cx.alloc(a.0 * cx.ab, Adapters, "_to_copy");
            cx.free(a.2);
            a.2 = narrow;
        }
    }
    let copy = |elems| Param {
        elems,
        matrix: true,
        bytes: pb,
        rows: m.vocab_size,
        tp_sharded: false,
    };
    let ab = cx.ab;
    lora.save_embed
        .then(|| copy(table))
        .into_iter()
        .chain(adapters.iter().map(|&(elems, rows, _)| Param {
            elems,
            matrix: true,
            bytes: ab,
            rows,
            tp_sharded: false,
        }))
        .chain(lora.save_head.then(|| copy(table)))
        .collect()
}

/// bitsandbytes' blockwise state for one parameter of `elems` elements (`Optimizer2State.init_state` /
/// `Optimizer1State.init_state`, 0.50.2): at least 4096 elements (`min_8bit_size`), each state uint8 of its
/// shape and an fp32 absmax per 256-element block, states first; below, fp32 states. Paged, a uint8 state of at
/// least 1e5 elements is CUDA managed memory (`get_state_buffer` -> `F.get_paged`), which PyTorch's allocator
/// never sees: the estimate, like `max_memory_allocated()`, does not count it (on a real GPU it lives on the
/// device until memory runs short; nvidia-smi counts it).
fn bnb_state(cx: &mut Ctx, elems: u64, n_states: u64, paged: bool) -> Vec<Tensor> {
    let mut v = Vec::new();
    if elems < 4096 {
        for _ in 0..n_states {
            v.push(cx.alloc(elems * 4, OptState, "zeros_like"));
        }
        return v;
    }
    if !(paged && elems >= 100_000) {
        for _ in 0..n_states {
            v.push(cx.alloc(elems, OptState, "zeros_like"));
        }
    }
    for _ in 0..n_states {
        v.push(cx.alloc(elems.div_ceil(256) * 4, OptState, "zeros"));
    }
    v
}

fn optimizer_stage(
    cx: &mut Ctx,
    step: u32,
    setup: &Setup,
    params: &[Param],
    state: &mut Vec<Tensor>,
) {
    cx.sim.stage(step, "optimizer");
    let tr = &setup.train;
    if tr.grad_clip > 0.0 {
        // clip_grad_norm_: `_foreach_norm` gives one fp32 scalar per parameter, then `stack` and the total norm;
        // the grads are scaled in place.
        let norms: Vec<Tensor> = params
            .iter()
            .map(|_| cx.alloc(4, Temporary, "_foreach_norm"))
            .collect();
        let stacked = cx.alloc(4 * params.len() as u64, Temporary, "stack");
        cx.free(stacked);
        cx.sim.free_all(&norms);
    }
    match tr.optimizer {
        Optimizer::AdamW | Optimizer::AdamWFused => {
            if state.is_empty() {
                // Lazy state: exp_avg and exp_avg_sq = zeros_like(p) per parameter; `step` is a device scalar for
                // the fused kernel and a CPU scalar for foreach (torch/optim/adamw.py `_init_group`).
                for p in params {
                    if tr.optimizer == Optimizer::AdamWFused {
                        state.push(cx.alloc(4, OptState, "zeros"));
                    }
                    state.push(cx.alloc(p.elems * p.bytes, OptState, "zeros_like"));
                    state.push(cx.alloc(p.elems * p.bytes, OptState, "zeros_like"));
                }
            }
            if tr.optimizer == Optimizer::AdamW {
                // _multi_tensor_adamw: the only out-of-place op is `exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`,
                // one tensor per parameter of the group, freed when the group is done. Groups run one after the
                // other: nanoGPT has a decay group (matrices) and a no-decay group; HF-style loops one group.
                let bytes = |p: &Param| p.elems * p.bytes;
                let groups: Vec<Vec<u64>> = match cx.arch.program {
                    Program::NanoGpt => vec![
                        params.iter().filter(|p| p.matrix).map(bytes).collect(),
                        params.iter().filter(|p| !p.matrix).map(bytes).collect(),
                    ],
                    // With tensor parallelism the one group splits in two by kind (`Param::tp_sharded`).
                    Program::HfLoop => {
                        let first = params.first().is_some_and(|p| p.tp_sharded);
                        let of = |kind: bool| -> Vec<u64> {
                            params
                                .iter()
                                .filter(|p| p.tp_sharded == kind)
                                .map(bytes)
                                .collect()
                        };
                        vec![of(first), of(!first)]
                    }
                };
                // Sequence parallel without FSDP: the embedding's gradient is Replicate (the whole table, see
                // `eager::backward`) where its parameter and state are Shard(0), so each foreach op that reads
                // the gradients redistributes it (`_replicate_to_shard`: a copy of this GPU's rows, freed after
                // the op): one for `_foreach_lerp_(exp_avgs, grads)`, two for `_foreach_addcmul_(exp_avg_sqs,
                // grads, grads)`, before `_foreach_sqrt` (stub-cuda snapshots of llama-tp4-sp, llama-tp2-sp). The
                // embedding is the first parameter, so in the HF loop's first group.
                let p = &tr.parallel;
                let replicated_embedding = (p.sequence_parallel
                    && p.tp > 1
                    && p.strategy != Strategy::Fsdp
                    && cx.arch.program == Program::HfLoop)
                    .then(|| params.first().filter(|e| e.tp_sharded).map(bytes))
                    .flatten();
                for (i, group) in groups.into_iter().enumerate() {
                    if let Some(shard) = replicated_embedding.filter(|_| i == 0) {
                        let lerp = cx.alloc(shard, Temporary, "_replicate_to_shard");
                        cx.free(lerp);
                        let addcmul = [
                            cx.alloc(shard, Temporary, "_replicate_to_shard"),
                            cx.alloc(shard, Temporary, "_replicate_to_shard"),
                        ];
                        cx.sim.free_all(&addcmul);
                    }
                    let tmp: Vec<Tensor> = group
                        .iter()
                        .map(|&b| cx.alloc(b, Temporary, "_foreach_sqrt"))
                        .collect();
                    cx.sim.free_all(&tmp);
                }
            }
        }
        Optimizer::SgdMomentum => {
            if state.is_empty() {
                // First step: momentum_buffer = clone(grad) per parameter.
                for p in params {
                    state.push(cx.alloc(p.elems * p.bytes, OptState, "clone"));
                }
            }
        }
        Optimizer::Sgd => {}
        Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit | Optimizer::Lion8bit => {
            if state.is_empty() {
                let paged = tr.optimizer == Optimizer::PagedAdamW8bit;
                let n_states = if tr.optimizer == Optimizer::Lion8bit {
                    1
                } else {
                    2
                };
                // The 256-entry fp32 quantization maps (`name2qmap`, dynamic and unsigned dynamic for Adam's second
                // moment), moved to the device once and shared by every parameter's state.
                for _ in 0..n_states {
                    state.push(cx.alloc(256 * 4, OptState, "qmap"));
                }
                for p in params {
                    state.extend(bnb_state(cx, p.elems, n_states, paged));
                }
            }
            // bitsandbytes' blockwise 8-bit update kernels work in place: no temporaries.
        }
        Optimizer::Lion => {
            if state.is_empty() {
                // bitsandbytes' 32-bit state is fp32 whatever the parameter's dtype (`init_state`).
                for p in params {
                    state.push(cx.alloc(p.elems * 4, OptState, "zeros_like"));
                }
            }
        }
        Optimizer::Adafactor => {
            if state.is_empty() {
                // `_init_group`: a matrix's `row_var` [rows, 1] and `col_var` [1, cols] (`grad.new_zeros`, the
                // gradient's dtype); anything else a full `variance`; `step` a host scalar.
                for p in params {
                    if p.rows > 1 && p.elems / p.rows > 1 {
                        state.push(cx.alloc(p.rows * p.bytes, OptState, "new_zeros"));
                        state.push(cx.alloc(p.elems / p.rows * p.bytes, OptState, "new_zeros"));
                    } else {
                        state.push(cx.alloc(p.elems * p.bytes, OptState, "zeros_like"));
                    }
                }
            }
            // `_multi_tensor_adafactor`: the squared gradients and each matrix's variance estimate (row x col),
            // full-size per parameter, alive until the group is done (tests/data/finetune/README.md).
            let tmp: Vec<Tensor> = params
                .iter()
                .flat_map(|p| [p.elems * p.bytes, p.elems * p.bytes])
                .map(|b| cx.alloc(b, Temporary, "_foreach_mul"))
                .collect();
            cx.sim.free_all(&tmp);
        }
    }
    if tr.zero_grad_set_to_none {
        // zero_grad(set_to_none=True): every .grad is released; the next backward creates them again.
        let grads = std::mem::take(&mut cx.grads);
        cx.sim.free_all(&grads);
        cx.have_grads = false;
    }
    // zero_grad(set_to_none=False) zeroes .grad in place (`_foreach_zero_`): nothing is allocated or freed, and
    // the next backward accumulates into it (have_grads stays true).
}

/// Bytes of the parameters as allocated (each tensor its own block).
pub fn weights_block_bytes(params: &[(u64, bool)], bytes_per_elem: u64) -> u64 {
    params
        .iter()
        .map(|&(e, _)| block_bytes(e * bytes_per_elem))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::MODEL_PRESETS;

    #[test]
    fn later_micro_steps_repeat_the_second() {
        for id in ["nanogpt-30m", "tinyllama-1.1b"] {
            let mut s = crate::presets::model_preset(id).unwrap();
            s.model.n_layer = 2;
            // Micro-steps simulated in full, without the shortcut: 2, 3 and 7 of them peak alike.
            let peak_with = |n: u64| run_micro_steps_exactly(&s, n);
            assert_eq!(peak_with(2), peak_with(3), "{id}");
            assert_eq!(peak_with(3), peak_with(7), "{id}");
        }
    }

    /// The peak of one step with exactly `n` micro-steps (no shortcut), for the test above.
    fn run_micro_steps_exactly(setup: &Setup, n: u64) -> u64 {
        let mut sim = Sim::counting_only();
        let mut cx = Ctx::new(&mut sim, setup).unwrap();
        let mut lp = Loop::start(&mut cx);
        for _ in 0..n {
            lp.micro_step(&mut cx, setup, 1);
        }
        drop(cx);
        sim.peak().bytes
    }

    /// Sweeps and the fit map (`estimate_peak`) say what the report says: before both ran three steps, the
    /// gpt2-large preset's reserved was 15,218 MiB for the fit map and 15,464 MiB in the report.
    #[test]
    fn peak_only_estimates_agree_with_the_report() {
        for p in MODEL_PRESETS {
            let s = (p.setup)();
            let report = crate::estimate(&s).unwrap();
            let peaks = crate::estimate_peak(&s).unwrap();
            let got = (
                peaks.peak_allocated_bytes,
                peaks.peak_reserved_bytes,
                peaks.device_total_bytes,
            );
            let want = (
                report.peak_allocated_bytes,
                report.peak_reserved_bytes,
                report.device_total_bytes,
            );
            assert_eq!(got, want, "{}", p.id);
        }
    }

    /// `fits` stops a run once its reserved memory is past the budget, and says what the full run says.
    #[test]
    fn fits_is_the_full_runs_verdict() {
        for p in MODEL_PRESETS {
            let mut s = (p.setup)();
            s.model.n_layer = s.model.n_layer.min(4);
            let total = crate::estimate_peak(&s).unwrap().device_total_bytes;
            for budget in [0, total / 2, total - 1, total, total + 1, 2 * total] {
                assert_eq!(
                    crate::fits(&s, budget).unwrap(),
                    total <= budget,
                    "{} {budget}",
                    p.id
                );
            }
        }
    }

    #[test]
    fn step_three_repeats_step_two() {
        for p in MODEL_PRESETS {
            for checkpointing in [false, true] {
                let mut s = (p.setup)();
                s.model.n_layer = s.model.n_layer.min(4);
                s.train.checkpointing = checkpointing;
                s.train.grad_accum_steps = 2;
                let sim = simulate(&s).unwrap();
                let peaks = sim.step_peaks();
                assert_eq!(peaks[2], peaks[3], "{}", p.id);
            }
        }
    }
}
