//! Training on more than one GPU (`train.parallel`): which strategy, how many GPUs, and the strategy's own
//! arguments under PyTorch's names. Every estimate is per GPU (rank 0, the rank that holds the most: see
//! tests/data/parallel/README.md).
//!
//! - `ddp`: `DistributedDataParallel` (`bucket_cap_mb`, `gradient_as_bucket_view`, `static_graph`).
//! - `fsdp`: FSDP2's `fully_shard` on every block, then on the root (`reshard_after_forward`, `mp_policy` as
//!   `mixed_precision`, `offload_policy=CPUOffloadPolicy()` as `offload`).
//! - ZeRO's names, mapped onto what is modelled: `zero3` is `fsdp` (parameters, gradients and optimizer state
//!   sharded; parameters gathered per block and freed after its forward), `zero2` is `fsdp` with
//!   `reshard_after_forward: false` (the gathered parameters stay from the forward to the backward, as ZeRO-2 keeps
//!   whole parameters; gradients and optimizer state sharded). `zero1` (only the optimizer state sharded: PyTorch's
//!   `ZeroRedundancyOptimizer` over DDP) is not modelled and is refused by name.
//! - `tp` (tensor parallelism, DTensor's `parallelize_module` on every decoder layer): plan basic, the common
//!   recipe (q/k/v/gate/up `ColwiseParallel`, o/down `RowwiseParallel`; embedding, norms and head replicated), or
//!   with `sequence_parallel` torchtitan's Llama recipe: norms `SequenceParallel` (the residual stream sharded on
//!   the sequence), attention and MLP inputs all-gathered (`PrepareModuleInput`), o/down reduce-scattering to the
//!   sequence shard, the embedding `RowwiseParallel` and the head `ColwiseParallel` sharded on the vocabulary, the
//!   loss under `loss_parallel()`. Alone (`strategy` single, `gpus` = `tp`) or under FSDP2 on a (dp, tp) mesh
//!   (`strategy` fsdp, dp = `gpus` / `tp`): FSDP shards each GPU's tensor-parallel piece over dp. What one GPU
//!   holds of the model is `Parallel::tp_local`: the same description with a GPU's share of the heads, the MLP
//!   width (and the vocabulary with sequence parallel); `run/distributed.rs` adds what DTensor allocates.

use crate::arch::{Arch, Mlp, Qkv};
use crate::error::Error;
use crate::model::{Family, ModelConfig, TrainConfig};
use crate::policy::{Attention, Precision};

/// How the step is spread over GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One GPU: no process group.
    Single,
    /// `torch.nn.parallel.DistributedDataParallel`: every GPU holds the whole model.
    Ddp,
    /// FSDP2 (`torch.distributed.fsdp.fully_shard`) per block and on the root.
    Fsdp,
}

impl Strategy {
    /// The names `train.parallel.strategy` takes; the `zero` names are mapped by `parse`.
    pub const NAMES: &'static [&'static str] = &["single", "ddp", "fsdp", "zero2", "zero3"];

    /// The strategy and, for the ZeRO names, the `reshard_after_forward` they stand for.
    ///
    /// # Errors
    /// An unknown name; `zero1`, which is not modelled.
    pub fn parse(s: &str) -> Result<(Strategy, Option<bool>), Error> {
        match s {
            "single" => Ok((Strategy::Single, None)),
            "ddp" => Ok((Strategy::Ddp, None)),
            // The records' name for the same (tests/data/parallel).
            "fsdp" | "fsdp2" => Ok((Strategy::Fsdp, None)),
            "zero3" => Ok((Strategy::Fsdp, Some(true))),
            "zero2" => Ok((Strategy::Fsdp, Some(false))),
            "zero1" => Err(Error::NotModelled {
                what:
                    "train.parallel.strategy \"zero1\" (optimizer state sharded alone: PyTorch's \
                       ZeroRedundancyOptimizer over DDP); zero2 and zero3 are, as fsdp"
                        .into(),
            }),
            _ => Err(Error::UnknownValue {
                field: "train.parallel.strategy".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Single => "single",
            Strategy::Ddp => "ddp",
            Strategy::Fsdp => "fsdp",
        }
    }
}

/// A floating-point dtype FSDP2's `MixedPrecisionPolicy` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    pub const NAMES: &'static [&'static str] = &["fp32", "bf16", "fp16"];

    /// `fp32`, `bf16`, `fp16`, or PyTorch's `float32`, `bfloat16`, `float16`.
    pub fn parse(field: &str, s: &str) -> Result<Dtype, Error> {
        match s {
            "fp32" | "float32" => Ok(Dtype::Fp32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "float16" => Ok(Dtype::Fp16),
            _ => Err(Error::UnknownValue {
                field: field.into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Bf16 | Dtype::Fp16 => 2,
        }
    }
}

/// More GPUs than this are refused: beyond any job vramfit could be asked about, and it keeps every product of
/// a size and the GPU count far inside 64 bits.
pub const MAX_GPUS: u64 = 1 << 20;

/// The largest `bucket_cap_mb` accepted (1 TiB of bucket: one bucket for any model).
pub const MAX_BUCKET_CAP_MB: u64 = 1 << 20;

/// `train.parallel`.
#[derive(Debug, Clone, PartialEq)]
pub struct Parallel {
    pub strategy: Strategy,
    /// GPUs in the job (`world_size`); the batch is per GPU.
    pub gpus: u64,
    /// Tensor-parallel degree (1: none): the GPUs each layer's Linears are split over (the tp mesh dimension).
    pub tp: u64,
    /// Sequence parallel with tensor parallelism (torchtitan's recipe, see the module's doc); false: plan basic.
    pub sequence_parallel: bool,
    /// DDP's `bucket_cap_mb`; `None` is PyTorch's default (25 MiB, and a first bucket of 1 MiB).
    pub bucket_cap_mb: Option<u64>,
    /// DDP's `gradient_as_bucket_view`.
    pub gradient_as_bucket_view: bool,
    /// DDP's `static_graph` (its first forward's outputs pass through `_DDPSink`, which clones them).
    pub static_graph: bool,
    /// FSDP2's `reshard_after_forward`, given to every `fully_shard` call, the root's included.
    pub reshard_after_forward: bool,
    /// `MixedPrecisionPolicy(param_dtype=...)`: the dtype parameters are gathered and computed in; `None`: the
    /// parameters' own (`train.precision`).
    pub param_dtype: Option<Dtype>,
    /// `MixedPrecisionPolicy(reduce_dtype=...)`: the dtype gradients are reduce-scattered in; `None`: the
    /// gradients' own (`param_dtype`).
    pub reduce_dtype: Option<Dtype>,
    /// FSDP2's `offload_policy=CPUOffloadPolicy()`: sharded parameters, gradients and optimizer state on the host.
    pub offload: bool,
    /// Tensor parallelism alone: the whole model is built on the GPU and `parallelize_module` then shards it (the
    /// tensor_parallelism example of pytorch/examples, and the measured records: `step::tp_parallelized`);
    /// false: built on the meta device and materialised as this GPU's shards (torchtitan's way, what a model too
    /// large for one GPU needs).
    pub init_on_device: bool,
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel::single()
    }
}

impl Parallel {
    /// One GPU.
    pub fn single() -> Parallel {
        Parallel {
            strategy: Strategy::Single,
            gpus: 1,
            tp: 1,
            sequence_parallel: false,
            bucket_cap_mb: None,
            gradient_as_bucket_view: false,
            static_graph: false,
            reshard_after_forward: true,
            param_dtype: None,
            reduce_dtype: None,
            offload: false,
            init_on_device: false,
        }
    }

    /// `strategy` on `gpus` GPUs with PyTorch's defaults for everything else.
    pub fn new(strategy: Strategy, gpus: u64) -> Parallel {
        Parallel {
            strategy,
            gpus,
            ..Parallel::single()
        }
    }

    /// One GPU: no data-parallel wrapper and no tensor parallelism.
    pub fn is_single(&self) -> bool {
        self.strategy == Strategy::Single && self.tp == 1
    }

    /// Tensor parallelism as a person would name it (`None` without it): the degree and the plan.
    pub fn tp_name(&self) -> Option<String> {
        (self.tp > 1).then(|| {
            format!(
                "tensor parallel over {} ({})",
                self.tp,
                if self.sequence_parallel {
                    "sequence parallel, loss_parallel"
                } else {
                    "plan basic"
                }
            )
        })
    }

    /// The ZeRO stage a person would call this, if any.
    pub fn zero_name(&self) -> Option<&'static str> {
        match self.strategy {
            Strategy::Fsdp if self.reshard_after_forward => Some("ZeRO-3"),
            Strategy::Fsdp => Some("ZeRO-2"),
            _ => None,
        }
    }

    /// The parameters' compute dtype under FSDP's mixed precision, when it differs from `precision`'s: the step
    /// then runs as pure `bf16` does (no autocast), on parameters kept in `precision`'s dtype.
    pub fn compute_precision(&self, precision: Precision) -> Precision {
        match (self.strategy, self.param_dtype) {
            (Strategy::Fsdp, Some(Dtype::Bf16)) => Precision::Bf16,
            _ => precision,
        }
    }

    /// Data-parallel GPUs: the ones FSDP shards over (`gpus` / `tp`, the dp mesh dimension).
    pub fn dp(&self) -> u64 {
        self.gpus / self.tp.max(1)
    }

    /// What one GPU holds of the model under tensor parallelism, as a model of its own (`tp` 1: the model):
    /// `ColwiseParallel` gives each GPU `n_head / tp` query heads and `n_kv_head / tp` key/value heads of the same
    /// head size, and `intermediate_size / tp` of the MLP (q/k/v/gate/up `Shard(0)`, o/down `Shard(1)`: [C, q/tp],
    /// [C, I/tp]); with sequence parallel the embedding and head hold `vocab_size / tp` rows (`Shard(0)`), and the
    /// logits `vocab_size / tp` columns. Everything else (norms, the hidden width, the sequence the attention
    /// sees) is the model's. `check_model` has made every division exact.
    pub fn tp_local(&self, m: &ModelConfig) -> ModelConfig {
        if self.tp <= 1 {
            return m.clone();
        }
        let t = self.tp;
        ModelConfig {
            n_head: m.n_head / t,
            n_kv_head: m.n_kv_head / t,
            head_dim: m.head_dim(),
            intermediate_size: m.intermediate_size / t,
            vocab_size: if self.sequence_parallel {
                m.vocab_size / t
            } else {
                m.vocab_size
            },
            ..m.clone()
        }
    }

    /// Tensor parallelism against the model and the training: the families whose layers the plan maps onto
    /// (separate q/k/v and gate/up Linears, norms within a head), and the dimensions it divides.
    ///
    /// # Errors
    /// `NotModelled` naming a family or a combination; `Invalid` naming a dimension `tp` does not divide.
    pub fn check_model(&self, m: &ModelConfig, t: &TrainConfig) -> Result<(), Error> {
        if self.tp <= 1 {
            return Ok(());
        }
        let tp = self.tp;
        let family = m.family.name();
        let refuse = |why: &str| {
            Err(Error::NotModelled {
                what: format!(
                    "train.parallel.tp ({tp}) with model.family {family:?}: {why}; tensor parallelism is \
                     modelled for llama-shaped layers (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3)"
                ),
            })
        };
        let arch = Arch::of(m, Attention::Sdpa);
        if m.family == Family::Gpt2 {
            return refuse(
                "nanoGPT's fused c_attn projects q, k and v in one Linear, which ColwiseParallel would split by \
                 its full width (q, k and v mixed across GPUs), not by head",
            );
        }
        if arch.qkv != Qkv::Separate || arch.packed_gate_up {
            return refuse(
                "its packed q/k/v (or gate/up) projection would be split by its full width by ColwiseParallel, \
                 not by head",
            );
        }
        if matches!(arch.mlp, Mlp::Moe(_)) {
            return refuse("its experts are split by expert parallelism, not by this plan");
        }
        if arch.qk_norm_full {
            return refuse(
                "its q and k norms span the whole projection, whose statistics would then span every GPU",
            );
        }
        if t.lora.is_some() || t.quantization.is_some() {
            return Err(Error::NotModelled {
                what: format!(
                    "train.lora or train.quantization with train.parallel.tp ({tp}): fine-tuning was measured on \
                     one GPU only"
                ),
            });
        }
        let divides = |field: &str, value: u64, why: &str| {
            if value.is_multiple_of(tp) {
                Ok(())
            } else {
                Err(Error::invalid(
                    field,
                    value,
                    format!("must be a multiple of train.parallel.tp ({tp}): {why}"),
                ))
            }
        };
        divides(
            "model.n_head",
            m.n_head,
            "each GPU computes n_head / tp heads",
        )?;
        divides(
            "model.n_kv_head",
            m.n_kv_head,
            "each GPU holds n_kv_head / tp key/value heads",
        )?;
        divides(
            "model.intermediate_size",
            m.intermediate_size,
            "each GPU holds intermediate_size / tp of the MLP",
        )?;
        if self.sequence_parallel {
            divides(
                "model.vocab_size",
                m.vocab_size,
                "sequence parallel shards the embedding and the head on the vocabulary",
            )?;
            divides(
                "train.seq_len",
                t.seq_len,
                "sequence parallel shards the residual stream on the sequence",
            )?;
        }
        Ok(())
    }

    /// Checks the fields against each other and the training setup; the message names the field and value.
    ///
    /// # Errors
    /// An [`Error`] naming the first problem found.
    pub fn validate(&self, precision: Precision, compile: bool) -> Result<(), Error> {
        let f = |k: &str| format!("train.parallel.{k}");
        // First: the GPU count defaults to `tp` where it is not given, and a zero there is the tp's.
        if self.tp == 0 {
            return Err(Error::invalid(&f("tp"), self.tp, "must be at least 1"));
        }
        if self.gpus == 0 || self.gpus > MAX_GPUS {
            return Err(Error::invalid(
                &f("gpus"),
                self.gpus,
                format!("must be from 1 to {MAX_GPUS}"),
            ));
        }
        if self.tp == 0 || self.tp > self.gpus || !self.gpus.is_multiple_of(self.tp) {
            return Err(Error::invalid(
                &f("tp"),
                self.tp,
                format!(
                    "must be at least 1 and divide train.parallel.gpus ({})",
                    self.gpus
                ),
            ));
        }
        let name = self.strategy.name();
        // Without a data-parallel wrapper every GPU is a tensor-parallel one.
        if self.strategy == Strategy::Single && self.gpus != self.tp {
            return Err(Error::invalid(
                &f("gpus"),
                self.gpus,
                format!(
                    "needs a strategy (train.parallel.strategy: ddp or fsdp) beyond train.parallel.tp ({})",
                    self.tp
                ),
            ));
        }
        if self.sequence_parallel && self.tp == 1 {
            return Err(Error::invalid(
                &f("sequence_parallel"),
                true,
                "shards the sequence over the tensor-parallel GPUs: it needs train.parallel.tp beyond 1",
            ));
        }
        if self.tp > 1 && self.strategy == Strategy::Ddp {
            return Err(Error::NotModelled {
                what: format!(
                    "train.parallel.strategy \"ddp\" with train.parallel.tp ({}): DistributedDataParallel over \
                     tensor-parallel (DTensor) parameters is not measured; fsdp with tp is (FSDP2 on a (dp, tp) mesh)",
                    self.tp
                ),
            });
        }
        if self.init_on_device && !(self.tp > 1 && self.strategy == Strategy::Single) {
            return Err(Error::invalid(
                &f("init_on_device"),
                true,
                "applies to tensor parallelism alone (train.parallel.tp beyond 1, strategy single): DDP always \
                 builds the whole model on each GPU, FSDP2 materialises its shards (to_empty)",
            ));
        }
        if self.tp > 1 && self.offload {
            return Err(Error::NotModelled {
                what: format!(
                    "train.parallel.offload with train.parallel.tp ({}): CPU offload was measured without tensor \
                     parallelism only",
                    self.tp
                ),
            });
        }
        if self.tp > 1 && compile {
            return Err(Error::NotModelled {
                what: format!(
                    "torch.compile with train.parallel.tp ({}) (not measured yet); \
                     eager mode is modelled (train.compile false, --no-compile)",
                    self.tp
                ),
            });
        }
        let not_of = |field: &str, value: String, of: &str| {
            Err(Error::invalid(
                &f(field),
                value,
                format!("is a field of {of}; the strategy is {name}"),
            ))
        };
        if self.strategy != Strategy::Ddp {
            if let Some(mb) = self.bucket_cap_mb {
                return not_of("bucket_cap_mb", mb.to_string(), "ddp");
            }
            if self.gradient_as_bucket_view {
                return not_of("gradient_as_bucket_view", "true".into(), "ddp");
            }
            if self.static_graph {
                return not_of("static_graph", "true".into(), "ddp");
            }
        }
        if self.strategy != Strategy::Fsdp {
            if !self.reshard_after_forward {
                return not_of("reshard_after_forward", "false".into(), "fsdp");
            }
            if let Some(d) = self.param_dtype {
                return not_of(
                    "mixed_precision.param_dtype",
                    format!("{:?}", d.name()),
                    "fsdp",
                );
            }
            if let Some(d) = self.reduce_dtype {
                return not_of(
                    "mixed_precision.reduce_dtype",
                    format!("{:?}", d.name()),
                    "fsdp",
                );
            }
            if self.offload {
                return not_of("offload", "true".into(), "fsdp");
            }
        }
        if let Some(mb) = self.bucket_cap_mb {
            if mb > MAX_BUCKET_CAP_MB {
                return Err(Error::invalid(
                    &f("bucket_cap_mb"),
                    mb,
                    format!("must be at most {MAX_BUCKET_CAP_MB}"),
                ));
            }
        }
        if let Some(d) = self.param_dtype {
            let own = precision.param_bytes();
            if precision.autocast() {
                return Err(Error::NotModelled {
                    what: format!(
                        "train.parallel.mixed_precision.param_dtype ({:?}) under autocast (train.precision {:?}): \
                         FSDP's mixed precision is measured without autocast (train.precision \"fp32\")",
                        d.name(),
                        precision.name()
                    ),
                });
            }
            if d == Dtype::Fp16 || d.bytes() > own {
                return Err(Error::NotModelled {
                    what: format!(
                        "train.parallel.mixed_precision.param_dtype ({:?}) with train.precision {:?}: modelled are \
                         \"bf16\" and the parameters' own dtype",
                        d.name(),
                        precision.name()
                    ),
                });
            }
        }
        if !self.is_single() && compile {
            return Err(Error::NotModelled {
                what: format!(
                    "torch.compile with train.parallel.strategy {name:?} (not measured yet); \
                     eager mode is modelled (train.compile false, --no-compile)"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{setup_from_value, setup_to_value};
    use serde_json::json;

    fn with(par: serde_json::Value) -> Result<crate::Setup, Error> {
        let s = setup_from_value(
            &json!({"model": {"family": "llama", "n_layer": 2, "n_head": 4,
            "n_embd": 256, "intermediate_size": 512, "vocab_size": 1000, "block_size": 64},
            "train": {"precision": "fp32", "parallel": par}}),
        )?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn setup_json_round_trips_and_names_zero_stages() {
        for par in [
            json!({"strategy": "ddp", "gpus": 8, "bucket_cap_mb": 5, "gradient_as_bucket_view": true}),
            json!({"strategy": "fsdp", "gpus": 64, "reshard_after_forward": false,
                   "mixed_precision": {"param_dtype": "bf16", "reduce_dtype": "fp32"}, "offload": true}),
            json!({"strategy": "fsdp", "gpus": 8, "tp": 2, "sequence_parallel": true,
                   "reshard_after_forward": true}),
            json!({"strategy": "single", "gpus": 2, "tp": 2}),
        ] {
            let s = with(par.clone()).unwrap();
            let v = setup_to_value(&s);
            assert_eq!(v["train"]["parallel"], par);
            assert_eq!(setup_from_value(&v).unwrap(), s);
        }
        let z3 = with(json!({"strategy": "zero3", "gpus": 8})).unwrap();
        assert_eq!(z3.train.parallel.strategy, Strategy::Fsdp);
        assert!(z3.train.parallel.reshard_after_forward);
        assert_eq!(z3.train.parallel.zero_name(), Some("ZeRO-3"));
        let z2 = with(json!({"strategy": "zero2", "gpus": 8})).unwrap();
        assert!(!z2.train.parallel.reshard_after_forward);
        assert_eq!(z2.train.parallel.zero_name(), Some("ZeRO-2"));
        // One GPU writes no `parallel` at all: every earlier setup JSON stays as it was.
        let one = with(json!({"strategy": "single"})).unwrap();
        assert!(setup_to_value(&one)["train"].get("parallel").is_none());
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let e = |par: serde_json::Value| with(par).unwrap_err().to_string();
        assert_eq!(
            e(json!({"strategy": "zero1", "gpus": 8})),
            "not modelled: train.parallel.strategy \"zero1\" (optimizer state sharded alone: PyTorch's \
             ZeroRedundancyOptimizer over DDP); zero2 and zero3 are, as fsdp"
        );
        assert_eq!(
            e(json!({"strategy": "ddp", "gpus": 0})),
            "train.parallel.gpus (0) must be from 1 to 1048576"
        );
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "gradient_as_bucket_view": true})),
            "train.parallel.gradient_as_bucket_view (true) is a field of ddp; the strategy is fsdp"
        );
        assert_eq!(
            e(json!({"strategy": "ddp", "gpus": 8, "reshard_after_forward": false})),
            "train.parallel.reshard_after_forward (false) is a field of fsdp; the strategy is ddp"
        );
        assert_eq!(
            e(json!({"strategy": "zero2", "gpus": 8, "reshard_after_forward": true})),
            "train.parallel.reshard_after_forward (true) contradicts train.parallel.strategy \"zero2\", which \
             means reshard_after_forward false"
        );
        assert_eq!(
            e(json!({"strategy": "single", "gpus": 4})),
            "train.parallel.gpus (4) needs a strategy (train.parallel.strategy: ddp or fsdp) beyond \
             train.parallel.tp (1)"
        );
        assert_eq!(
            e(json!({"strategy": "single", "tp": 0})),
            "train.parallel.tp (0) must be at least 1"
        );
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "tp": 3})),
            "train.parallel.tp (3) must be at least 1 and divide train.parallel.gpus (8)"
        );
        assert_eq!(
            e(json!({"strategy": "ddp", "gpus": 8, "tp": 2})),
            "not modelled: train.parallel.strategy \"ddp\" with train.parallel.tp (2): DistributedDataParallel \
             over tensor-parallel (DTensor) parameters is not measured; fsdp with tp is (FSDP2 on a (dp, tp) mesh)"
        );
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "sequence_parallel": true})),
            "train.parallel.sequence_parallel (true) shards the sequence over the tensor-parallel GPUs: it needs \
             train.parallel.tp beyond 1"
        );
        // 4 heads, 1000 tokens of vocabulary (see `with`): tp 8 divides neither heads nor, with sp, the vocabulary.
        assert_eq!(
            e(json!({"strategy": "single", "gpus": 8, "tp": 8})),
            "model.n_head (4) must be a multiple of train.parallel.tp (8): each GPU computes n_head / tp heads"
        );
        assert_eq!(
            e(json!({"strategy": "single", "gpus": 8, "tp": 8, "sequence_parallel": true})),
            "model.n_head (4) must be a multiple of train.parallel.tp (8): each GPU computes n_head / tp heads"
        );
        assert!(with(json!({"strategy": "fsdp", "gpus": 8, "tp": 2})).is_ok());
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "mixed_precision": {"param_dtype": "fp8"}})),
            "train.parallel.mixed_precision.param_dtype (\"fp8\") is not one of: fp32, bf16, fp16"
        );
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "buckets": 2})),
            "unknown field \"train.parallel.buckets\""
        );
    }

    /// What `tp_local` leaves one GPU, against the records' `params.local_numel` (tests/data/parallel, Llama with
    /// 4 layers, hidden 512, 8 heads / 4 KV heads of 64, intermediate 1376, vocab 16384, untied). By hand, tp 2:
    /// q 256 x 512 + k, v 128 x 512 each + o 512 x 256 = 393,216; gate, up 688 x 512 and down 512 x 688 =
    /// 1,056,768; two norms 1,024: 1,451,008 a layer, x 4 = 5,804,032; + the final norm 512 + embedding and head
    /// 2 x 16384 x 512 = 16,777,216: 22,581,760 (llama-tp2, 90,327,040 B in fp32). Sequence parallel halves the
    /// embedding and head: 14,193,152 (llama-tp2-sp). Under FSDP2 on dp 2 each GPU holds half of that (every dim
    /// 0 is even): 11,290,880 (llama-tp2-fsdp2) and 7,096,576 (llama-tp2-sp-fsdp2-mp).
    #[test]
    fn tp_local_parameters_are_the_records() {
        let m = crate::model::ModelConfig {
            family: crate::model::Family::Llama,
            n_layer: 4,
            n_head: 8,
            n_kv_head: 4,
            n_embd: 512,
            block_size: 256,
            vocab_size: 16384,
            intermediate_size: 1376,
            ..Default::default()
        };
        let local = |tp: u64, sp: bool| {
            let p = Parallel {
                tp,
                sequence_parallel: sp,
                ..Parallel::new(Strategy::Single, tp)
            };
            let l = p.tp_local(&m);
            Arch::of(&l, Attention::Sdpa).param_shapes(&l)
        };
        let sum = |v: &[(u64, bool, u64)]| v.iter().map(|x| x.0).sum::<u64>();
        let per_dp = |v: &[(u64, bool, u64)], dp: u64| {
            v.iter()
                .map(|&(e, _, rows)| rows.div_ceil(dp) * (e / rows))
                .sum::<u64>()
        };
        assert_eq!(sum(&local(2, false)), 22_581_760);
        assert_eq!(sum(&local(2, false)) * 4, 90_327_040);
        assert_eq!(sum(&local(2, true)), 14_193_152);
        assert_eq!(sum(&local(4, false)), 19_681_792);
        assert_eq!(sum(&local(4, true)), 7_098_880);
        assert_eq!(per_dp(&local(2, false), 2), 11_290_880);
        assert_eq!(per_dp(&local(2, true), 2), 7_096_576);
        // The plan shards 7 tensors a layer (q, k, v, o, gate, up, down): the records' `dtensor_params` 28.
        let whole = Arch::of(&m, Attention::Sdpa).param_shapes(&m);
        let sharded = whole
            .iter()
            .zip(&local(2, false))
            .filter(|(w, l)| w.0 != l.0)
            .count();
        assert_eq!(sharded, 28);
    }

    /// Families the plan does not map onto are refused by name, with the reason.
    #[test]
    fn tp_refuses_families_by_name() {
        let e = |family: &str| {
            let mut model = json!({"family": family, "n_layer": 2, "n_head": 4, "n_embd": 256,
                "vocab_size": 1024, "block_size": 64});
            if family != "gpt2" {
                model["intermediate_size"] = 512.into();
            }
            if family == "mixtral" {
                model["n_experts"] = 4.into();
                model["experts_per_token"] = 2.into();
            }
            let s = setup_from_value(&json!({"model": model,
                "train": {"precision": "bf16-amp", "parallel": {"strategy": "single", "tp": 2},
                    "attention": if family == "gemma2" { "manual" } else { "sdpa" }}}));
            s.and_then(|s| s.validate()).map_err(|e| e.to_string())
        };
        assert!(e("gpt2").unwrap_err().contains("nanoGPT's fused c_attn"));
        assert!(e("phi3").unwrap_err().contains("packed q/k/v"));
        assert!(e("gpt_neox").unwrap_err().contains("packed q/k/v"));
        assert!(e("mixtral").unwrap_err().contains("expert parallelism"));
        assert!(e("olmo2")
            .unwrap_err()
            .contains("span the whole projection"));
        for ok in [
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
        ] {
            assert_eq!(e(ok), Ok(()), "{ok}");
        }
    }

    /// Tensor parallelism holds less per GPU than one GPU, and sequence parallel less than plan basic; the
    /// components add up.
    #[test]
    fn tensor_parallel_holds_less() {
        let peak = |par: serde_json::Value| crate::estimate(&with(par).unwrap()).unwrap();
        let one = peak(json!({"strategy": "single"}));
        let basic = peak(json!({"strategy": "single", "tp": 2}));
        let sp = peak(json!({"strategy": "single", "tp": 2, "sequence_parallel": true}));
        let fsdp = peak(json!({"strategy": "fsdp", "gpus": 4, "tp": 2, "sequence_parallel": true}));
        assert!(basic.peak_allocated_bytes < one.peak_allocated_bytes);
        assert!(sp.peak_allocated_bytes < basic.peak_allocated_bytes);
        for r in [&basic, &sp, &fsdp] {
            assert_eq!(r.components.total(), r.peak_allocated_bytes);
        }
    }

    /// Sharding never adds: FSDP on more GPUs holds no more per GPU, and below DDP's and one GPU's.
    #[test]
    fn more_gpus_hold_less() {
        let peak = |par: serde_json::Value| crate::estimate(&with(par).unwrap()).unwrap();
        let one = peak(json!({"strategy": "single"}));
        let ddp = peak(json!({"strategy": "ddp", "gpus": 8}));
        assert!(ddp.peak_allocated_bytes > one.peak_allocated_bytes);
        let mut last = u64::MAX;
        for w in [1, 2, 8, 64] {
            let f = peak(json!({"strategy": "fsdp", "gpus": w}));
            assert!(f.peak_allocated_bytes <= last, "{w}");
            last = f.peak_allocated_bytes;
        }
        assert!(last < one.peak_allocated_bytes);
        assert_eq!(one.components.total(), one.peak_allocated_bytes);
        assert_eq!(ddp.components.total(), ddp.peak_allocated_bytes);
    }
}
