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

use crate::error::Error;
use crate::policy::Precision;

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
    /// Tensor-parallel degree (1: none). Not modelled beyond 1 yet.
    pub tp: u64,
    /// DDP's `bucket_cap_mb`; `None` is PyTorch's default (25 MiB, and a first bucket of 1 MiB).
    pub bucket_cap_mb: Option<u64>,
    /// DDP's `gradient_as_bucket_view`.
    pub gradient_as_bucket_view: bool,
    /// DDP's `static_graph` (allocates as the default; kept so that a setup says what it runs).
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
            bucket_cap_mb: None,
            gradient_as_bucket_view: false,
            static_graph: false,
            reshard_after_forward: true,
            param_dtype: None,
            reduce_dtype: None,
            offload: false,
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

    pub fn is_single(&self) -> bool {
        self.strategy == Strategy::Single
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

    /// Checks the fields against each other and the training setup; the message names the field and value.
    ///
    /// # Errors
    /// An [`Error`] naming the first problem found.
    pub fn validate(&self, precision: Precision, compile: bool) -> Result<(), Error> {
        let f = |k: &str| format!("train.parallel.{k}");
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
        if self.tp > 1 {
            return Err(Error::NotModelled {
                what: format!(
                    "train.parallel.tp ({}): tensor parallelism (measured in tests/data/parallel, not modelled yet)",
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
                    "torch.compile with train.parallel.strategy {name:?} (not measured yet); eager is"
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
            e(json!({"strategy": "fsdp", "gpus": 8, "tp": 3})),
            "train.parallel.tp (3) must be at least 1 and divide train.parallel.gpus (8)"
        );
        assert!(e(json!({"strategy": "fsdp", "gpus": 8, "tp": 2})).contains("tensor parallelism"));
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "mixed_precision": {"param_dtype": "fp8"}})),
            "train.parallel.mixed_precision.param_dtype (\"fp8\") is not one of: fp32, bf16, fp16"
        );
        assert_eq!(
            e(json!({"strategy": "fsdp", "gpus": 8, "buckets": 2})),
            "unknown field \"train.parallel.buckets\""
        );
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
