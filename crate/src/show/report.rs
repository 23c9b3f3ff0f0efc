//! What a person reads: the peak, what it is made of, when it happens, reserved and on-device totals.

use crate::finetune::Quantization;
use crate::model::Setup;
use crate::sim::{Category, Peak, Sim};
use serde::Serialize;

/// Bytes of each component at the peak. They add up to `peak_allocated_bytes`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Components {
    pub weights_bytes: u64,
    /// A bitsandbytes base's packed Linear weights and quantization state (0 without one).
    pub quantized_weights_bytes: u64,
    /// LoRA's trained adapters and `modules_to_save` copies (0 without LoRA).
    pub adapters_bytes: u64,
    pub weight_copies_bytes: u64,
    pub grads_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub logits_bytes: u64,
    pub temporary_bytes: u64,
    pub workspace_bytes: u64,
    /// What the caching allocator counts beyond the live tensors: the unsplit remainders of its blocks
    /// (`sim::Peak::block_remainder_bytes`).
    pub block_remainders_bytes: u64,
}

impl Components {
    fn from_peak(peak: &Peak) -> Components {
        let at = |c: Category| peak.by_category[c.index()];
        Components {
            weights_bytes: at(Category::Weights),
            quantized_weights_bytes: at(Category::QuantizedWeights),
            adapters_bytes: at(Category::Adapters),
            weight_copies_bytes: at(Category::WeightCopies),
            grads_bytes: at(Category::Grads),
            optimizer_bytes: at(Category::Optimizer),
            activations_bytes: at(Category::Activations),
            logits_bytes: at(Category::Logits),
            temporary_bytes: at(Category::Temporary),
            workspace_bytes: at(Category::Workspace),
            block_remainders_bytes: peak.block_remainder_bytes,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights_bytes
            + self.quantized_weights_bytes
            + self.adapters_bytes
            + self.weight_copies_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.temporary_bytes
            + self.workspace_bytes
            + self.block_remainders_bytes
    }

    /// (name, bytes, what it is) for display, largest first. The quantized base is "quantized weights" here;
    /// [`Components::items_for`] names its kind.
    pub fn items(&self) -> Vec<(&'static str, u64, &'static str)> {
        self.items_for(None)
    }

    /// [`Components::items_for`] for `setup`: a quantized mixture of experts' weights are mostly its router and
    /// fused experts, which bitsandbytes leaves unquantized (no `nn.Linear`) and peft casts to fp32.
    pub fn items_for_setup(&self, setup: &Setup) -> Vec<(&'static str, u64, &'static str)> {
        let mut v = self.items_for(setup.train.quantization);
        if setup.train.quantization.is_some() && setup.model.n_experts > 0 {
            for item in v.iter_mut().filter(|item| item.0 == "weights") {
                item.2 = MOE_UNQUANTIZED;
            }
        }
        v
    }

    /// [`Components::items`] for a setup whose base is quantized by `quant` ("4-bit weights", "int8 weights").
    pub fn items_for(&self, quant: Option<Quantization>) -> Vec<(&'static str, u64, &'static str)> {
        let quantized = match quant {
            Some(Quantization::Int8) => "int8 weights",
            Some(_) => "4-bit weights",
            None => "quantized weights",
        };
        // Under LoRA (adapters present) the weights are the frozen base; beside a quantized base, its rest.
        let lora = self.adapters_bytes > 0;
        let weights = match (quant, lora) {
            (Some(_), _) => "the frozen base's other parameters: embeddings, norms, head (fp32 after prepare_model_for_kbit_training)",
            (None, true) => "the frozen base's parameters and buffers",
            (None, false) => "parameters and buffers",
        };
        let mut v = vec![
            ("weights", self.weights_bytes, weights),
            (
                quantized,
                self.quantized_weights_bytes,
                "the frozen base's bitsandbytes Linears: packed weights and quantization state",
            ),
            (
                "adapters",
                self.adapters_bytes,
                "LoRA's trained A and B matrices (and modules_to_save copies)",
            ),
            (
                "weight copies",
                self.weight_copies_bytes,
                "autocast's 2-byte copies of the weights",
            ),
            (
                "grads",
                self.grads_bytes,
                if lora {
                    "the trained parameters' .grad"
                } else {
                    "parameter .grad"
                },
            ),
            (
                "optimizer",
                self.optimizer_bytes,
                if lora {
                    "the trained parameters' optimizer state"
                } else {
                    "optimizer state"
                },
            ),
            (
                "activations",
                self.activations_bytes,
                "tensors saved for backward, and the batch",
            ),
            (
                "logits",
                self.logits_bytes,
                "B x T x vocab: the logits and the loss's buffers and gradients",
            ),
            (
                "temporary",
                self.temporary_bytes,
                "activation gradients and op outputs in flight",
            ),
            (
                "workspace",
                self.workspace_bytes,
                "cuBLAS workspaces and kernel scratch",
            ),
            (
                "block remainders",
                self.block_remainders_bytes,
                "PyTorch counts whole blocks: a cached block is split only if over 1 MiB would be left, so \
                 a tensor in a larger block counts the block's size",
            ),
        ];
        sort_descending(&mut v, |item| item.1);
        v
    }
}

/// One point of the timeline: the highest live bytes within a stage of a step.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stage {
    pub step: u32,
    pub stage: &'static str,
    pub peak_bytes: u64,
    pub end_bytes: u64,
}

/// Under gradient accumulation, the micro-step each timeline stage belongs to, as a person reads it: "1", "2",
/// and for the last one simulated the micro-steps it stands for ("2-4" under 4 steps: they repeat it exactly and
/// are not simulated again). `None` for the optimizer, and for every stage without accumulation. Without this the
/// table and the plot named each simulated micro-step's stages alike ("step 1 forward" twice).
pub fn micro_steps(timeline: &[Stage], grad_accum_steps: u64) -> Vec<Option<String>> {
    let (mut step, mut micro) = (0, 0_u64);
    timeline
        .iter()
        .map(|s| {
            if s.step != step {
                (step, micro) = (s.step, 0);
            }
            if s.stage == "forward" {
                micro += 1;
            }
            if grad_accum_steps <= 1 || s.stage == "optimizer" {
                return None;
            }
            let simulated = timeline
                .iter()
                .filter(|t| t.step == s.step && t.stage == "forward")
                .count() as u64;
            Some(if micro == simulated && simulated < grad_accum_steps {
                format!("{micro}-{grad_accum_steps}")
            } else {
                micro.to_string()
            })
        })
        .collect()
}

/// The CUDA context beside the allocator's memory: a fact of the device (`describe::model`), re-exported here
/// where the report adds it to the device total.
pub use crate::model::{
    cuda_context_bytes, CUDA_CONTEXT_BYTES_DATACENTER, CUDA_CONTEXT_BYTES_GEFORCE,
    CUDA_CONTEXT_BYTES_RANGE,
};

/// Peak allocated, reserved and device total of a run, without the breakdown.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Peaks {
    pub peak_allocated_bytes: u64,
    /// The caching allocator's peak reserved memory (see `allocator`).
    pub peak_reserved_bytes: u64,
    pub device_total_bytes: u64,
    /// The most `cudaMalloc` segments held at once (`memory_stats()["segment.all.peak"]`).
    pub n_segments: u64,
    /// Allocations that had to release the allocator's whole cache and retry (`num_alloc_retries`).
    pub n_alloc_retries: u64,
    /// Whether an allocation failed within the device's memory (`num_ooms` > 0): the run would stop with
    /// `torch.OutOfMemoryError`. The figures then go on as if the device were larger.
    pub oom: bool,
}

impl Peaks {
    /// `sm`: the device's compute capability, for its CUDA context (`cuda_context_bytes`).
    pub(crate) fn from_sim(sim: &Sim, sm: u32) -> Peaks {
        let allocated = sim.peak().bytes;
        let stats = sim.allocator().stats();
        // The allocator holds at least what is live; the floor only matters for a request too large for any
        // device, which the allocator refuses outright.
        let reserved = stats.reserved_bytes.peak.max(allocated);
        Peaks {
            peak_allocated_bytes: allocated,
            peak_reserved_bytes: reserved,
            device_total_bytes: reserved + cuda_context_bytes(sm),
            n_segments: stats.segments.peak,
            n_alloc_retries: stats.n_alloc_retries,
            oom: stats.n_ooms > 0,
        }
    }
}

/// What a multi-GPU estimate is and is not (nothing on one GPU).
fn parallel_notes(p: &crate::parallel::Parallel) -> Vec<String> {
    use crate::parallel::Strategy;
    if p.is_single() {
        return Vec::new();
    }
    let tp = p.tp_name().map(|t| format!(", {t}")).unwrap_or_default();
    let what = match p.strategy {
        Strategy::Single => p.tp_name().unwrap_or_default(),
        Strategy::Ddp => "DDP".to_string(),
        Strategy::Fsdp => {
            format!(
                "FSDP2 ({}{}{})",
                p.zero_name().unwrap_or(""),
                p.param_dtype
                    .map(|d| format!(", parameters gathered in {}", d.name()))
                    .unwrap_or_default(),
                if p.offload { ", CPU offload" } else { "" }
            ) + &tp
        }
    };
    let mut notes = vec![
        format!(
            "per GPU on {} GPUs with {what}: rank 0, which holds the most; the batch is per GPU",
            p.gpus
        ),
        "not counted: NCCL's own buffers and communicators (cudaMalloc'd outside PyTorch's allocator, hundreds of \
         MiB per communicator on a real machine)"
            .to_string(),
    ];
    if p.strategy == Strategy::Single && p.tp > 1 {
        notes.push(if p.init_on_device {
            "tensor parallel alone, built on the GPU: the whole model is made on each GPU, then \
             parallelize_module shards it (pytorch/examples' tensor_parallelism, the measured runs), so the full \
             parameters pass through the GPU and their blocks stay cached"
                .to_string()
        } else {
            "tensor parallel alone, built on the meta device and materialised as each GPU's shards (torchtitan); \
             init_on_device counts the whole model built on the GPU first, as pytorch/examples' \
             tensor_parallelism does"
                .to_string()
        });
    }
    notes
}

/// The estimate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub n_params: u64,
    /// What `torch.cuda.max_memory_allocated()` reports after a few steps: the caching allocator's count of the
    /// blocks it hands out (the live tensors at the peak when the allocator is not replayed).
    pub peak_allocated_bytes: u64,
    /// The live tensors at their highest, each rounded to 512 bytes, without the allocator's block remainders:
    /// the sum of the sizes the run asks for (what a fake-tensor count measures). At most peak allocated.
    pub peak_tensor_bytes: u64,
    /// Modelled `torch.cuda.max_memory_reserved()`: the caching allocator replayed over the run (`allocator`).
    pub peak_reserved_bytes: u64,
    /// Reserved plus the device's CUDA context (`cuda_context_bytes`): what nvidia-smi would show for the process.
    pub device_total_bytes: u64,
    pub device_total_range_bytes: (u64, u64),
    pub peak_phase: String,
    pub peak_op: &'static str,
    pub peak_step: u32,
    pub components: Components,
    /// Activations saved for backward by one transformer block (forward of step 1, block 0).
    pub activations_per_block_bytes: u64,
    /// Highest live bytes in each step (index 0: the model on the device, before training).
    pub step_peaks_bytes: Vec<u64>,
    pub timeline: Vec<Stage>,
    /// Device memory given in the setup (0 when none).
    pub device_memory_bytes: u64,
    /// See `Peaks`: segments at most, allocation retries, and whether the allocator ran out of memory.
    pub n_segments: u64,
    pub n_alloc_retries: u64,
    pub oom: bool,
    pub fits: Option<bool>,
    pub notes: Vec<String>,
}

impl Report {
    pub(crate) fn from_sim(setup: &Setup, sim: &Sim, activations_per_block_bytes: u64) -> Report {
        let peak = sim.peak();
        let components = Components::from_peak(peak);
        let peaks = Peaks::from_sim(sim, setup.device.sm);
        let reserved = peaks.peak_reserved_bytes;
        let device_total = peaks.device_total_bytes;
        let mem = setup.device.memory_bytes;
        let mut notes = vec![
            if setup.train.compile {
                "torch.compile (Inductor, default passes): the compiled step's buffers, checked against PyTorch's own \
                 allocator (docs/ACCURACY.md)"
                    .to_string()
            } else {
                "eager mode (no torch.compile)".to_string()
            },
            "PyTorch 2.15 CUDA ops; peak allocated is checked against measurements (docs/ACCURACY.md)".to_string(),
            "peak reserved replays PyTorch's caching allocator, checked against PyTorch's own allocator run on a \
             stubbed device (docs/ACCURACY.md); the CUDA context is a published figure, not measured here"
                .to_string(),
        ];
        if setup.train.grad_accum_steps > 1 {
            notes.push("later micro-steps accumulate into existing .grad in place".to_string());
        }
        notes.extend(parallel_notes(&setup.train.parallel));
        // PyTorch 2.15's own SDPA chooser on each generation (tests/data/stub-cuda/sdpa_choice.json): cuDNN
        // attention first on sm_90 and sm_100 for fp16/bf16. Its saved tensors are flash's (output and
        // log-sum-exp, by the op's schema); its backward workspace is cuDNN's and unmeasured.
        if setup.train.attention == crate::policy::Attention::Sdpa
            && matches!(setup.device.sm, 90 | 100)
            && setup.train.precision.matmul_bytes() == 2
        {
            notes.push(
                "PyTorch picks cuDNN attention on this GPU; the estimate counts FlashAttention-2's tensors \
                 (the same saved output and log-sum-exp; cuDNN's backward workspace is not measured)"
                    .to_string(),
            );
        }
        if setup.train.attention == crate::policy::Attention::FlashAttention2 {
            notes.push(
                "flash_attention_2: flash-attn 2.8's tensors as its CUDA extension allocates them \
                 (csrc/flash_attn/flash_api.cpp; measured on a stub device with the extension replaced by those \
                 allocations, not on a GPU); the fp32 split-KV accumulators of small batches are not counted"
                    .to_string(),
            );
        }
        if let Some(l) = &setup.train.lora {
            let trainable = crate::finetune::trainable_params(&setup.model, l);
            let total = setup.model.n_params() + trainable;
            notes.push(format!(
                "LoRA (peft): r={} on {}{}; {} trainable parameters of {} ({:.2}%): only they have .grad and \
                 optimizer state; the base is frozen in {}",
                l.r,
                l.targets.names().join(", "),
                match l.modules_to_save().as_slice() {
                    [] => String::new(),
                    m => format!(", trainable copies of {}", m.join(", ")),
                },
                trainable,
                total,
                100.0 * trainable as f64 / total as f64,
                match (setup.train.quantization, crate::finetune::base_bytes(setup)) {
                    (Some(q), _) => format!(
                        "{} (bitsandbytes Linears; embeddings, norms and head fp32 after \
                         prepare_model_for_kbit_training)",
                        q.describe()
                    ),
                    (None, 4) => "fp32".into(),
                    _ => setup.train.base_dtype.map_or("bf16", |d| d.name()).into(),
                },
            ));
        }
        if setup.train.quantization == Some(crate::finetune::Quantization::Int8) {
            let bound = crate::finetune::int8_outlier_bound_bytes(
                &setup.model,
                setup.train.batch_size * setup.train.seq_len,
                setup.train.precision.matmul_bytes(),
            );
            notes.push(format!(
                "8-bit base: the estimate has no LLM.int8 outlier columns (inputs with |x| >= 6.0); real \
                 activations add their columns of each 8-bit Linear's input, kept until the backward: a few \
                 columns in practice, at most {:.1} GiB if every column were one",
                bound as f64 / (1u64 << 30) as f64
            ));
        }
        // PyTorch's allocator collects cached blocks by garbage_collection_threshold only under a memory
        // fraction (`set_fraction` in CUDACachingAllocator's malloc); measured alone, it moves nothing
        // (tests/data/stub-cuda/alloc-conf.json: the founding case at 0.6, TinyLlama at 0.8).
        let conf = &setup.train.alloc_conf;
        if conf.garbage_collection_threshold.is_some() && conf.memory_fraction.is_none() {
            notes.push(
                "garbage_collection_threshold acts only under torch.cuda.set_per_process_memory_fraction, which \
                 this setup does not set: PyTorch's allocator then never collects by it, and the estimate is the \
                 same as without it"
                    .to_string(),
            );
        }
        if setup.train.optimizer == crate::policy::Optimizer::PagedAdamW8bit {
            notes.push(
                "paged AdamW8bit: the 8-bit states of parameters of 1e5 elements or more are CUDA managed memory, \
                 which PyTorch's counters (and this estimate) do not include; on a GPU with room they stay on it"
                    .to_string(),
            );
        }
        Report {
            n_params: setup.model.n_params(),
            peak_allocated_bytes: peak.bytes,
            peak_tensor_bytes: sim.tensor_peak().bytes,
            peak_reserved_bytes: reserved,
            device_total_bytes: device_total,
            device_total_range_bytes: (
                reserved + CUDA_CONTEXT_BYTES_RANGE.0,
                reserved + CUDA_CONTEXT_BYTES_RANGE.1,
            ),
            peak_phase: peak.phase.label(),
            peak_op: peak.op,
            peak_step: peak.phase.step,
            components,
            activations_per_block_bytes,
            step_peaks_bytes: sim.step_peaks().to_vec(),
            timeline: sim
                .timeline()
                .iter()
                .map(|t| Stage {
                    step: t.step,
                    stage: t.stage,
                    peak_bytes: t.peak_bytes,
                    end_bytes: t.end_bytes,
                })
                .collect(),
            device_memory_bytes: mem,
            n_segments: peaks.n_segments,
            n_alloc_retries: peaks.n_alloc_retries,
            oom: peaks.oom,
            fits: (mem > 0).then_some(!peaks.oom && device_total <= mem),
            notes,
        }
    }

    /// Whether the step fits the device's memory, with the margin: ("fits", "1.20 GiB to spare") or
    /// ("does not fit", "2.50 GiB over"); `None` without a device memory. A step the modelled allocator cannot
    /// serve does not fit even when the device total it reached stays within the memory (the request that failed
    /// is not in it): then the margin says so instead of a negative one.
    pub fn verdict(&self) -> Option<(&'static str, String)> {
        let mem = self.device_memory_bytes;
        let total = self.device_total_bytes;
        match self.fits? {
            true => Some((
                "fits",
                format!("{} to spare", fmt_memory(mem.saturating_sub(total))),
            )),
            false if total > mem => {
                Some(("does not fit", format!("{} over", fmt_bytes(total - mem))))
            }
            false => Some((
                "does not fit",
                "the caching allocator runs out of memory during the step".to_string(),
            )),
        }
    }

    /// One sentence naming the largest component at the peak and why it is that size.
    pub fn largest_item_sentence(&self, setup: &Setup) -> String {
        let (name, bytes, what) = self.components.items_for_setup(setup)[0];
        let n = setup.train.batch_size * setup.train.seq_len;
        let detail = match name {
            "logits" => format!(
                "{} x {} tokens x {} vocab, held as {}",
                setup.train.batch_size,
                setup.train.seq_len,
                setup.model.vocab_size,
                if setup.train.compile {
                    "the logits, the zeros the autograd engine makes for their unused gradient and \
                     the fused loss's gradient"
                } else {
                    "logits, log-softmax and their gradients"
                }
            ),
            "activations" => format!(
                "{} block{} x {} saved per block for {} tokens{}",
                setup.model.n_layer,
                if setup.model.n_layer == 1 { "" } else { "s" },
                fmt_bytes(self.activations_per_block_bytes),
                n,
                match crate::finetune::merged_expert_bytes(setup) {
                    0 => String::new(),
                    b => format!(
                        ", of which {} a block are the experts' weights merged with their adapters (peft's \
                         ParamWrapper), which the grouped GEMMs save",
                        fmt_bytes(b)
                    ),
                }
            ),
            "weights" if setup.train.lora.is_some() => format!(
                "the frozen base{}",
                match (setup.train.quantization, setup.model.n_experts) {
                    (Some(_), 0) => "'s embeddings, norms and head (fp32 after prepare_model_for_kbit_training)",
                    (Some(_), _) => "'s router and fused experts, which bitsandbytes does not quantize (they are \
                                     no nn.Linear), embeddings, norms and head, all fp32 after \
                                     prepare_model_for_kbit_training",
                    (None, _) => "",
                }
            ),
            "grads" | "optimizer" if setup.train.lora.is_some() => format!(
                "{} trainable parameters (the adapters)",
                setup
                    .train
                    .lora
                    .as_ref()
                    .map_or(0, |l| crate::finetune::trainable_params(&setup.model, l))
            ),
            "weights" | "grads" | "optimizer" => format!("{} parameters", self.n_params),
            _ => what.to_string(),
        };
        format!(
            "The largest item at the peak is {name} ({}): {detail}.",
            fmt_bytes(bytes)
        )
    }
}

/// The weights of a quantized mixture of experts (`Components::items_for_setup`).
const MOE_UNQUANTIZED: &str = "the frozen base's other parameters: the router and fused experts (no nn.Linear, so \
                               bitsandbytes leaves them unquantized), embeddings, norms, head, all fp32 after \
                               prepare_model_for_kbit_training";

/// Sorts a handful of items (components, suggestions), largest key first, stable. An insertion sort: the
/// standard library's sorts are generic code instantiated once per element type, several KB of wasm each, for
/// lists of at most a dozen.
pub fn sort_descending<T>(v: &mut [T], key: impl Fn(&T) -> u64) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && key(&v[j - 1]) < key(&v[j]) {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// A device's memory for people (a GPU's, or what is left of it): `fmt_bytes`'s unit and digits, but never more
/// than the bytes: the figure is cut, not rounded, and where cutting loses something one more digit is shown, also
/// cut. An L40S's 46,068 MiB (44.988 GiB) is "44.98 GiB", never "45.0 GiB"; a whole 12 GiB is "12.0 GiB".
pub fn fmt_memory(bytes: u64) -> String {
    let Some((unit, size, mut digits)) = unit_of(bytes) else {
        return format!("{bytes} B");
    };
    let (bytes, size) = (u128::from(bytes), u128::from(size));
    let cut = |digits: u32| bytes * 10u128.pow(digits) / size;
    if cut(digits) * size != bytes * 10u128.pow(digits) {
        digits += 1;
    }
    let scaled = cut(digits);
    let scale = 10u128.pow(digits);
    match digits {
        0 => format!("{scaled} {unit}"),
        d => format!(
            "{}.{:0width$} {unit}",
            scaled / scale,
            scaled % scale,
            width = d as usize
        ),
    }
}

/// Bytes for people: GiB/MiB/KiB (powers of 2), three significant digits.
pub fn fmt_bytes(bytes: u64) -> String {
    match unit_of(bytes) {
        Some((unit, size, digits)) => {
            let v = bytes as f64 / size as f64;
            format!("{v:.prec$} {unit}", prec = digits as usize)
        }
        None => format!("{bytes} B"),
    }
}

/// `fmt_bytes` for a figure shown beside the memory `cap` it is compared with: one that fits is never shown above
/// the memory (`fmt_memory`, cut). Where rounding to three digits would carry it past `cap` (11.97 GiB as
/// "12.0 GiB" beside an RTX 4070's 11.99 GiB), it is cut as the memory is, with its fourth digit.
pub fn fmt_within(bytes: u64, cap: u64) -> String {
    let rounds_past = unit_of(bytes).is_some_and(|(_, size, digits)| {
        let scale = 10u128.pow(digits);
        let (b, size) = (u128::from(bytes), u128::from(size));
        let rounded = (b * scale * 2 + size) / (size * 2);
        rounded * size > u128::from(cap) * scale
    });
    if bytes <= cap && rounds_past {
        fmt_memory(bytes)
    } else {
        fmt_bytes(bytes)
    }
}

/// The unit `fmt_bytes` and `fmt_memory` show `bytes` in (the largest of GiB, MiB, KiB it reaches), the unit's
/// size, and the digits after the point for three significant ones (0 from 100 units, 1 from 10, else 2); `None`
/// under 1 KiB (shown in bytes).
fn unit_of(bytes: u64) -> Option<(&'static str, u64, u32)> {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    let &(unit, size) = UNITS.iter().find(|(_, size)| bytes >= *size)?;
    let digits = if bytes / size >= 100 {
        0
    } else if bytes / size >= 10 {
        1
    } else {
        2
    };
    Some((unit, size, digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A figure that fits is never shown above the memory it fits in: by hand, an RTX 4070's 12,282 MiB is
    /// 11.994 GiB ("11.99 GiB"); 12,260 MiB (11.973 GiB) rounds to "12.0 GiB" and is shown cut, "11.97 GiB";
    /// 12,200 MiB (11.914 GiB) rounds to "11.9 GiB" and stays so; a figure over the memory is rounded as ever.
    #[test]
    fn a_figure_that_fits_is_never_shown_above_the_memory() {
        const MIB: u64 = 1 << 20;
        let cap = 12_282 * MIB;
        assert_eq!(fmt_memory(cap), "11.99 GiB");
        assert_eq!(fmt_bytes(12_260 * MIB), "12.0 GiB");
        assert_eq!(fmt_within(12_260 * MIB, cap), "11.97 GiB");
        assert_eq!(fmt_within(cap, cap), "11.99 GiB");
        assert_eq!(fmt_within(12_200 * MIB, cap), "11.9 GiB");
        assert_eq!(fmt_within(12_290 * MIB, cap), "12.0 GiB");
        assert_eq!(fmt_within(4_330 * MIB, cap), "4.23 GiB");
    }

    /// A device's memory is never shown above what it has (the audit: an L40S's 46,068 MiB showed as
    /// "45.0 GiB"). By hand: 46,068 / 1,024 = 44.988 GiB; 81,559 MiB = 79.647 GiB; 143,771 MiB = 140.401 GiB;
    /// 32,607 MiB = 31.843 GiB; 23,028 MiB = 22.488 GiB.
    #[test]
    fn device_memory_is_cut_never_rounded_up() {
        const MIB: u64 = 1 << 20;
        for (mib, shown) in [
            (46_068, "44.98 GiB"),
            (81_559, "79.64 GiB"),
            (143_771, "140.4 GiB"),
            (32_607, "31.84 GiB"),
            (23_028, "22.48 GiB"),
            (12 * 1024, "12.0 GiB"),
            (180 * 1024, "180 GiB"),
            (15_360, "15.0 GiB"),
            (7 * 1024 + 512, "7.50 GiB"),
            (1023, "1023 MiB"),
        ] {
            assert_eq!(fmt_memory(mib * MIB), shown, "{mib} MiB");
        }
        assert_eq!(fmt_memory(1023), "1023 B");
        // Rounding to the nearest, as other figures are, would say more than the device has.
        assert_eq!(fmt_bytes(46_068 * MIB), "45.0 GiB");
        // Never above, and within one unit of the last digit shown, for every GPU preset.
        for g in crate::presets::GPU_PRESETS {
            let text = fmt_memory(g.memory_bytes);
            let v: f64 = text.split(' ').next().unwrap().parse().unwrap();
            let gib = g.memory_bytes as f64 / (1u64 << 30) as f64;
            assert!(v <= gib && gib - v < 0.1, "{}: {text} for {gib} GiB", g.id);
        }
    }

    /// The founding case as its user ran it (compiled, gradient accumulation 4, RTX 4070) showed about 4,464 MiB
    /// in nvidia-smi. Predicted: the modelled reserved memory plus the GeForce CUDA context (256 MiB, a published
    /// figure, see `cuda_context_bytes`, not tuned to this case). PyTorch's own allocator reserves 4,048 MiB for
    /// the training step on a stubbed RTX 4070 (`nanogpt-30m-founding-accum4-sm89-compiled`), which the model
    /// meets to the MiB since it follows Inductor's inlined residual stream (`compiled::Inlined`): 4,304 MiB
    /// on the device, -3.6% from what nvidia-smi showed. The rest is train.py's evaluation before the
    /// first step, which the estimate does not model: on PyTorch's own allocator it reserves 140 MiB more
    /// (tests/data/stub-cuda/seed-run-eval.json: 4,188 MiB, 4,444 with the context, -0.4%). Issue 11's 3% was met
    /// at -2.9% by a model of the step 30 MiB high; the step is now PyTorch's and the evaluation the known rest.
    #[test]
    fn founding_case_device_total_is_pytorchs_step_and_below_what_its_user_saw_by_the_evaluation() {
        let mut s = crate::presets::founding();
        s.train.grad_accum_steps = 4;
        assert!(s.train.compile && s.device.sm == 89);
        let r = crate::estimate(&s).unwrap();
        let mib = (1u64 << 20) as f64;
        let step = (4048.0 + 256.0) * mib;
        let err = (r.device_total_bytes as f64 - step) / step;
        assert!(
            err.abs() <= 0.01,
            "predicted {} vs PyTorch's allocator 4048 + 256 MiB: {:+.2}%",
            r.device_total_bytes >> 20,
            err * 100.0
        );
        // What nvidia-smi showed holds the evaluation too: below it by about its 140 MiB, never above.
        let seen = 4464.0 * mib;
        let gap = seen - r.device_total_bytes as f64;
        assert!(
            gap > 0.0 && gap < 200.0 * mib,
            "predicted {} vs 4464 MiB",
            r.device_total_bytes >> 20
        );
        // Eager would have been far off: the loss alone holds 4 more bytes per logit.
        let mut eager = s.clone();
        eager.train.compile = false;
        let e = crate::estimate(&eager).unwrap().device_total_bytes as f64;
        assert!((e - seen) / seen > 0.25, "eager {e}");
    }

    #[test]
    fn sort_descending_is_stable_and_largest_first() {
        let mut v = [(1, 'a'), (5, 'b'), (3, 'c'), (5, 'd'), (0, 'e'), (3, 'f')];
        sort_descending(&mut v, |x| x.0);
        assert_eq!(
            v,
            [(5, 'b'), (5, 'd'), (3, 'c'), (3, 'f'), (1, 'a'), (0, 'e')]
        );
        let mut empty: [(u64, char); 0] = [];
        sort_descending(&mut empty, |x| x.0);
    }

    #[test]
    fn formats_bytes_in_binary_units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(5 << 30), "5.00 GiB");
        assert_eq!(fmt_bytes(150 << 20), "150 MiB");
    }
}

#[cfg(test)]
mod finetune_breakdown {
    use crate::finetune::{linear4bit_tensors, Method};
    use crate::sim::block_bytes;

    /// QLoRA's breakdown names the 4-bit weights and the adapters apart from the rest of the weights, each the
    /// bytes its tensors take: per decoder Linear (q, k, v, o, gate, up, down) `Params4bit`'s packed weight and
    /// quantization state; per adapted Linear A (`r x in`) and B (`out x r`) in fp32.
    #[test]
    fn qlora_breakdown_names_the_four_bit_weights_and_the_adapters() {
        let full = crate::presets::model_preset("llama-3.2-1b").unwrap();
        let s = Method::Qlora.apply(&full);
        let m = &s.model;
        let (c, qd, kv, i) = (m.n_embd, m.q_dim(), m.kv_dim(), m.intermediate_size);
        let linears = [(c, qd), (c, kv), (c, kv), (qd, c), (c, i), (c, i), (i, c)];
        let four_bit: u64 = linears
            .iter()
            .flat_map(|(a, b)| linear4bit_tensors(a * b, true))
            .map(block_bytes)
            .sum::<u64>()
            * m.n_layer;
        let adapters: u64 = linears
            .iter()
            .map(|(a, b)| block_bytes(16 * a * 4) + block_bytes(b * 16 * 4))
            .sum::<u64>()
            * m.n_layer;
        let r = crate::estimate(&s).unwrap();
        let k = &r.components;
        assert_eq!(k.quantized_weights_bytes, four_bit);
        assert_eq!(k.adapters_bytes, adapters);
        assert_eq!(k.total(), r.peak_allocated_bytes);
        let items = k.items_for(s.train.quantization);
        let named = |n: &str| items.iter().find(|x| x.0 == n).map(|x| x.1);
        assert_eq!(named("4-bit weights"), Some(four_bit));
        assert_eq!(named("adapters"), Some(adapters));
        assert_eq!(named("quantized weights"), None);
        // Each says what it holds under QLoRA: the weights the base's unquantized rest, the state the adapters'.
        fn what(items: &[(&'static str, u64, &'static str)], n: &str) -> Option<&'static str> {
            items.iter().find(|x| x.0 == n).map(|x| x.2)
        }
        assert!(what(&items, "weights")
            .unwrap()
            .starts_with("the frozen base's other parameters"));
        assert_eq!(
            what(&items, "optimizer"),
            Some("the trained parameters' optimizer state")
        );
        // Full fine-tuning has neither, and its weights are all the parameters.
        let f = crate::estimate(&Method::Full.apply(&s)).unwrap().components;
        assert_eq!((f.quantized_weights_bytes, f.adapters_bytes), (0, 0));
        let fi = f.items_for(None);
        assert_eq!(what(&fi, "weights"), Some("parameters and buffers"));
        assert_eq!(what(&fi, "optimizer"), Some("optimizer state"));
    }

    /// QLoRA on OLMoE-1B-7B: bitsandbytes quantizes the attention's Linears only, and prepare_model_for_kbit_training
    /// casts the rest to fp32, the fused experts included: 4 B x (2 x 50,304 x 2048 for the embedding and head, 16
    /// layers x (4 norms of 2048, the router 64 x 2048, gate_up 64 x 2048 x 2048, down 64 x 2048 x 1024), the final
    /// norm's 2048) = 26,602,905,600 B, which the breakdown and the sentence name as the unquantized experts.
    #[test]
    fn moe_qlora_keeps_its_experts_in_fp32_and_says_so() {
        let s = Method::Qlora.apply(&crate::presets::model_preset("olmoe-1b-7b").unwrap());
        let r = crate::estimate(&s).unwrap();
        assert_eq!(r.components.weights_bytes, 26_602_905_600);
        let items = r.components.items_for_setup(&s);
        assert_eq!(items[0].0, "weights");
        assert!(items[0].2.contains(
            "the router and fused experts (no nn.Linear, so bitsandbytes leaves them \
                                     unquantized)"
        ));
        assert!(r
            .largest_item_sentence(&s)
            .contains("router and fused experts, which bitsandbytes does not quantize"));
    }
}

#[cfg(test)]
mod parallel_notes_tests {
    use super::parallel_notes;
    use crate::parallel::{Parallel, Strategy};

    /// Tensor parallelism alone says how the model was built: on the meta device (the default), or whole on each
    /// GPU first (`init_on_device`); under FSDP2 (built on the meta device, materialised by to_empty) neither.
    #[test]
    fn tensor_parallel_alone_notes_how_the_model_is_built() {
        let mut p = Parallel {
            gpus: 4,
            tp: 4,
            ..Parallel::default()
        };
        let says = |p: &Parallel, what: &str| parallel_notes(p).iter().any(|n| n.contains(what));
        assert!(says(&p, "built on the meta device"));
        p.init_on_device = true;
        assert!(says(&p, "whole model is made on each GPU"));
        p.init_on_device = false;
        p.strategy = Strategy::Fsdp;
        p.gpus = 8;
        assert!(!says(&p, "meta device") && !says(&p, "whole model"));
    }
}

#[cfg(test)]
mod alloc_conf_notes {
    /// garbage_collection_threshold without a memory fraction: the estimate is the same as without it, and a note
    /// says why (PyTorch collects only under set_per_process_memory_fraction); with a fraction the note goes.
    #[test]
    fn gc_threshold_alone_is_noted_as_inert() {
        let plain = crate::presets::founding();
        let mut gc = plain.clone();
        gc.train.alloc_conf =
            crate::model::parse_alloc_conf("garbage_collection_threshold:0.6").unwrap();
        let (a, b) = (
            crate::estimate(&plain).unwrap(),
            crate::estimate(&gc).unwrap(),
        );
        assert_eq!(
            (a.peak_allocated_bytes, a.peak_reserved_bytes),
            (b.peak_allocated_bytes, b.peak_reserved_bytes)
        );
        let noted = |r: &super::Report| {
            r.notes
                .iter()
                .any(|n| n.contains("set_per_process_memory_fraction"))
        };
        assert!(!noted(&a) && noted(&b));
        gc.train.alloc_conf.memory_fraction = Some(0.9);
        assert!(!noted(&crate::estimate(&gc).unwrap()));
    }
}
