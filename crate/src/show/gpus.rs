//! How many GPUs, and with which strategy (issue 14): the setup's memory per GPU on 1 to 64 GPUs under each way
//! of spreading data-parallel training, the fewest GPUs of the device's kind that fit each way, and the way to
//! advise: the fewest GPUs, and among equal counts the least traffic (DDP, then ZeRO-2, ZeRO-3, ZeRO-3 with CPU
//! offload: each gathers or moves more per step than the one before). Data only: `plot` draws it, `wasm` and
//! the CLI show it.
//!
//! Every figure is the estimate's own "on the device" total per GPU (rank 0), and a way fits where that total is
//! within the device's memory, as for one GPU (`crate::fits`).

use serde::Serialize;

use crate::error::Error;
use crate::estimates::Estimates;
use crate::model::Setup;
use crate::parallel::{Dtype, Parallel, Strategy};
use crate::policy::{Optimizer, Precision};
use crate::report::{fmt_bytes, fmt_memory, fmt_within};

/// The GPU counts plotted: powers of two from 1 to 64 (up to eight nodes of eight).
pub const PLOTTED_GPUS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The most GPUs the search for the fewest that fit tries.
pub const MAX_GPUS_SEARCHED: u64 = 4096;

/// A way of training on several GPUs, with PyTorch's defaults for what the setup does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Way {
    /// `DistributedDataParallel`: the whole model, its gradients and optimizer state on every GPU.
    Ddp,
    /// FSDP2 with `reshard_after_forward=False`: parameters gathered for the forward stay until the backward.
    Zero2,
    /// FSDP2 (`fully_shard` per block and on the root, defaults).
    Zero3,
    /// FSDP2 over the data-parallel dimension of a (dp, tp) mesh, tensor parallel (DTensor `parallelize_module`,
    /// sequence parallel where the model allows it) over the other: the usual recipe for the largest models.
    Zero3Tp,
    /// FSDP2 with `offload_policy=CPUOffloadPolicy()`: sharded state on the host.
    Zero3Offload,
}

impl Way {
    /// In the order of advice: least traffic first.
    pub const ALL: [Way; 5] = [
        Way::Ddp,
        Way::Zero2,
        Way::Zero3,
        Way::Zero3Tp,
        Way::Zero3Offload,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Way::Ddp => "ddp",
            Way::Zero2 => "zero2",
            Way::Zero3 => "zero3",
            Way::Zero3Tp => "zero3-tp",
            Way::Zero3Offload => "zero3-offload",
        }
    }

    /// The way's name for people; the tensor-parallel one names its degree and plan (`base`'s).
    pub fn label(self, base: &Base) -> String {
        match self {
            Way::Ddp => "DDP".into(),
            Way::Zero2 => "FSDP2, ZeRO-2 (reshard_after_forward=False)".into(),
            Way::Zero3 => "FSDP2, ZeRO-3".into(),
            Way::Zero3Tp => match base.tp {
                Some((t, true)) => {
                    format!("FSDP2, ZeRO-3 x tensor parallel {t} (sequence parallel)")
                }
                Some((t, false)) => format!("FSDP2, ZeRO-3 x tensor parallel {t}"),
                None => "FSDP2, ZeRO-3 x tensor parallel".into(),
            },
            Way::Zero3Offload => "FSDP2, ZeRO-3 with CPU offload".into(),
        }
    }

    /// The data-parallel way a setup's `train.parallel` is, if it is one of the plan's rows without tensor
    /// parallelism (one GPU, and tensor-parallel setups, are none: the degree is the plan's choice there).
    pub fn of(p: &Parallel) -> Option<Way> {
        match (p.strategy, p.tp, p.reshard_after_forward, p.offload) {
            (_, tp, ..) if tp > 1 => None,
            (Strategy::Single, ..) => None,
            (Strategy::Ddp, ..) => Some(Way::Ddp),
            (Strategy::Fsdp, _, false, _) => Some(Way::Zero2),
            (Strategy::Fsdp, _, true, false) => Some(Way::Zero3),
            (Strategy::Fsdp, _, true, true) => Some(Way::Zero3Offload),
        }
    }

    /// The GPU counts this way takes are multiples of this (the tensor-parallel degree; else 1).
    pub fn unit(self, base: &Base) -> u64 {
        match (self, base.tp) {
            (Way::Zero3Tp, Some((t, _))) => t,
            _ => 1,
        }
    }

    /// `base` (one GPU, see [`base`]) trained this way on `gpus` GPUs. Under FSDP2 bf16 training is its
    /// `MixedPrecisionPolicy` (param_dtype bf16, reduce_dtype fp32, fp32 parameters), as FSDP2's documentation
    /// recommends, where DDP runs bf16 autocast: [`base`] says which.
    pub fn apply(self, base: &Base, gpus: u64) -> Setup {
        let mut s = base.setup.clone();
        let mut p = match self {
            Way::Ddp => base.ddp.clone(),
            _ => base.fsdp.clone(),
        };
        p.gpus = gpus;
        p.reshard_after_forward = self != Way::Zero2;
        p.offload = self == Way::Zero3Offload;
        if let (Way::Zero3Tp, Some((t, sp))) = (self, base.tp) {
            p.tp = t;
            p.sequence_parallel = sp;
        }
        if self != Way::Ddp && base.bf16_mixed {
            s.train.precision = Precision::Fp32;
        }
        s.train.parallel = p;
        s
    }
}

/// The setup the ways start from: the setup on one GPU, its DDP and FSDP arguments, and whether it trains in
/// bf16 mixed precision (autocast, or FSDP2's policy), which each way then runs its own way.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    pub setup: Setup,
    ddp: Parallel,
    fsdp: Parallel,
    bf16_mixed: bool,
    /// The tensor-parallel degree and whether sequence parallel, for `Way::Zero3Tp`: the setup's own, else the
    /// largest of 8 (a node), 4, 2 the model takes, with sequence parallel where it can (torchtitan's default).
    pub tp: Option<(u64, bool)>,
    /// Why no degree was found (the message for the smallest one tried), where none was.
    tp_error: Option<String>,
    /// What the figures assume that the setup did not say, for people.
    pub notes: Vec<String>,
}

/// The ways' starting point for `setup`: its own DDP arguments where it is DDP, its FSDP2 ones where it is FSDP2
/// (PyTorch's defaults otherwise), tensor parallelism left out (data parallel only). torch.compile with DDP or
/// FSDP2 is not modelled, so a compiled setup's ways are estimated eager, and said so.
pub fn base(setup: &Setup) -> Base {
    let mut s = setup.clone();
    let p = &setup.train.parallel;
    let mut notes = Vec::new();
    let mut ddp = Parallel::new(Strategy::Ddp, 2);
    let mut fsdp = Parallel::new(Strategy::Fsdp, 2);
    match p.strategy {
        Strategy::Ddp => {
            ddp.bucket_cap_mb = p.bucket_cap_mb;
            ddp.gradient_as_bucket_view = p.gradient_as_bucket_view;
            ddp.static_graph = p.static_graph;
        }
        Strategy::Fsdp => {
            fsdp.param_dtype = p.param_dtype;
            fsdp.reduce_dtype = p.reduce_dtype;
        }
        Strategy::Single => {}
    }
    let fsdp_bf16 = p.strategy == Strategy::Fsdp
        && p.param_dtype == Some(Dtype::Bf16)
        && setup.train.precision == Precision::Fp32;
    // LoRA stays under autocast on every way: FSDP2's policy over a frozen base is not modelled, and measured it
    // allocates as much as autocast (tests/data/parallel: llama-lora-fsdp-w8-mp 351.96 MiB, llama-lora-fsdp-w8
    // 354.89 MiB), since autocast casts only the small fp32 adapters of a bf16 base.
    let lora = setup.train.lora.is_some();
    let bf16_mixed = (setup.train.precision == Precision::Bf16Amp || fsdp_bf16) && !lora;
    if lora && setup.train.precision == Precision::Bf16Amp {
        notes.push(
            "LoRA: DDP and FSDP2 under bf16 autocast (FSDP2's MixedPrecisionPolicy over a frozen base is not \
             modelled; for LoRA it was measured to allocate as much as autocast)"
                .into(),
        );
    }
    if bf16_mixed {
        s.train.precision = Precision::Bf16Amp;
        fsdp.param_dtype = Some(Dtype::Bf16);
        fsdp.reduce_dtype = fsdp.reduce_dtype.or(Some(Dtype::Fp32));
        notes.push(format!(
            "bf16 mixed precision: DDP under autocast, FSDP2 through its MixedPrecisionPolicy (param_dtype \
             bf16, reduce_dtype {}, fp32 parameters), as FSDP2 is meant to be run",
            fsdp.reduce_dtype.map_or("fp32", Dtype::name)
        ));
    }
    if let Some(t) = p.tp_name() {
        notes.push(format!(
            "the setup's {t} is kept in the tensor-parallel row only; the other rows are data parallel"
        ));
    }
    if setup.train.compile {
        s.train.compile = false;
        notes.push(
            "eager figures: torch.compile with DDP or FSDP2 is not modelled (compiling usually lowers them)"
                .into(),
        );
    }
    s.train.parallel = Parallel::single();
    let mut b = Base {
        setup: s,
        ddp,
        fsdp,
        bf16_mixed,
        tp: None,
        tp_error: None,
        notes,
    };
    let degrees: &[u64] = if p.tp > 1 { &[p.tp] } else { &[8, 4, 2] };
    'found: for &t in degrees {
        for sp in [true, false] {
            b.tp = Some((t, sp));
            match Way::Zero3Tp.apply(&b, t).validate() {
                Ok(()) => break 'found,
                Err(e) => {
                    b.tp = None;
                    b.tp_error = Some(e.to_string());
                }
            }
        }
    }
    if b.tp.is_some() {
        b.tp_error = None;
    }
    b
}

/// The fewest GPUs that fit, for one way.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub gpus: u64,
    /// On the device, per GPU.
    pub device_total_bytes: u64,
    /// The setup on that many GPUs (for "apply").
    pub setup: Setup,
    /// Host memory each GPU's process pins for its shard under CPU offload ([`offload_host_bytes`]).
    pub host_bytes: Option<u64>,
}

/// Host memory one GPU's process pins under FSDP2's CPU offload (`CPUOffloadPolicy(pin_memory=True)`): its
/// padded shard of every parameter (`Shard(0)`, rows rounded up to a multiple of the GPU count, as on the device
/// without offload) in the parameters' dtype, the sharded gradients copied there in the same dtype, and the
/// optimizer's state, created where the parameters are (`zeros_like` of each shard: AdamW's two moments, SGD's
/// momentum, Lion's fp32 moment). `None` without offload, and for the optimizers whose host state is not
/// modelled (bitsandbytes' 8-bit ones need a GPU; Adafactor's factored state).
pub fn offload_host_bytes(setup: &Setup) -> Option<u64> {
    let p = &setup.train.parallel;
    if !p.offload || p.strategy != Strategy::Fsdp {
        return None;
    }
    let arch = crate::arch::Arch::of(&setup.model, setup.train.attention);
    let elems: u64 = arch
        .param_shapes(&setup.model)
        .iter()
        .map(|&(e, _, rows)| rows.div_ceil(p.gpus) * (e / rows.max(1)))
        .sum();
    let pb = setup.train.precision.param_bytes();
    let state = match setup.train.optimizer {
        Optimizer::AdamW | Optimizer::AdamWFused => 2 * pb,
        Optimizer::SgdMomentum => pb,
        Optimizer::Lion => 4,
        Optimizer::Sgd => 0,
        _ => return None,
    };
    elems.checked_mul(2 * pb + state)
}

/// One way over the plotted GPU counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub way: Way,
    /// `Way::label`.
    pub label: String,
    /// (GPUs, on the device per GPU) at each plotted count; empty where the way is not modelled.
    pub points: Vec<(u64, u64)>,
    /// `None`: no memory given, or none fits up to [`MAX_GPUS_SEARCHED`] (see `Plan::budget_bytes`).
    pub fewest: Option<Fit>,
    /// Why the way has no figures (e.g. "not modelled: ..."), where it has none.
    pub error: Option<String>,
}

/// The whole answer to "how many GPUs, and which strategy".
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The device's memory (0: none given, so nothing fits or not).
    pub budget_bytes: u64,
    /// The setup on one GPU, on the device (`None` where that is not modelled).
    pub one_gpu_bytes: Option<u64>,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// One sentence of advice, and the setup it advises (absent where nothing needs changing or nothing fits).
    pub advice: String,
    pub advised: Option<Setup>,
}

/// The setup on the device, per GPU.
fn total(known: &mut Estimates, s: &Setup) -> Result<u64, Error> {
    Ok(known.report(s)?.device_total_bytes)
}

/// The fewest GPUs among the multiples of the way's unit in `lo + unit ..= hi` that fit `budget`, given that
/// `lo` does not and `hi` does (by bisection: per-GPU memory does not grow with the GPU count,
/// `parallel::tests::more_gpus_hold_less`).
fn bisect(
    known: &mut Estimates,
    base: &Base,
    way: Way,
    lo: u64,
    hi: u64,
    budget: u64,
) -> Result<u64, Error> {
    let u = way.unit(base);
    let (mut lo, mut hi) = (lo / u, hi / u);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if known.fits(&way.apply(base, mid * u), budget)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi * u)
}

fn row(known: &mut Estimates, base: &Base, way: Way, budget: u64) -> Result<Row, Error> {
    if way == Way::Zero3Tp && base.tp.is_none() {
        return Err(Error::NotModelled {
            what: base
                .tp_error
                .clone()
                .unwrap_or_default()
                .trim_start_matches("not modelled: ")
                .to_string(),
        });
    }
    // FSDP2 on one GPU is what CPU offload alone does for a model too large for it: counts start at 1; the
    // tensor-parallel way's at its degree.
    let unit = way.unit(base);
    let counts: Vec<u64> = PLOTTED_GPUS
        .iter()
        .copied()
        .filter(|w| w % unit == 0)
        .collect();
    // DDP replicates: nothing it allocates depends on the GPU count (measured: gpt-ddp-w8-bucket5 holds what
    // gpt-ddp-w2-gav does, tests/data/parallel/README.md; modelled: `ddp_does_not_depend_on_the_gpu_count`), so
    // one estimate stands for every count.
    let points: Vec<(u64, u64)> = if way == Way::Ddp {
        let t = total(known, &way.apply(base, 1))?;
        counts.iter().map(|&w| (w, t)).collect()
    } else {
        counts
            .iter()
            .map(|&w| Ok((w, total(known, &way.apply(base, w))?)))
            .collect::<Result<_, Error>>()?
    };
    let fewest = if budget == 0 {
        None
    } else if let Some(i) = points.iter().position(|&(_, t)| t <= budget) {
        let gpus = if i == 0 || way == Way::Ddp {
            points[i].0
        } else {
            bisect(known, base, way, points[i - 1].0, points[i].0, budget)?
        };
        Some(gpus)
    } else if way == Way::Ddp {
        None
    } else {
        // Beyond the plot: powers of two up to the search's end, then bisection below the first that fits.
        let mut prev = counts[counts.len() - 1];
        let mut found = None;
        while prev < MAX_GPUS_SEARCHED {
            let w = prev * 2;
            if known.fits(&way.apply(base, w), budget)? {
                found = Some(bisect(known, base, way, prev, w, budget)?);
                break;
            }
            prev = w;
        }
        found
    };
    let fewest = match fewest {
        Some(gpus) => {
            let setup = way.apply(base, gpus);
            let device_total_bytes = match points.iter().find(|p| p.0 == gpus) {
                Some(p) => p.1,
                None => total(known, &setup)?,
            };
            Some(Fit {
                gpus,
                device_total_bytes,
                host_bytes: offload_host_bytes(&setup),
                setup,
            })
        }
        None => None,
    };
    Ok(Row {
        way,
        label: way.label(base),
        points,
        fewest,
        error: None,
    })
}

/// The plan for `setup` on its device.
///
/// # Errors
/// An invalid setup. A way that is not modelled for it (LoRA with DDP or FSDP2, say) is a row with its reason,
/// not an error.
pub fn plan(setup: &Setup) -> Result<Plan, Error> {
    plan_with(&mut Estimates::new(), setup)
}

/// [`plan`], its estimates shared through `known` (the page's: its one-GPU figure is the page's estimate).
///
/// # Errors
/// As [`plan`].
pub fn plan_with(known: &mut Estimates, setup: &Setup) -> Result<Plan, Error> {
    setup.validate()?;
    let budget = setup.device.memory_bytes;
    let base = base(setup);
    let mut one = setup.clone();
    one.train.parallel = Parallel::single();
    let one_gpu_bytes = total(known, &one).ok();
    let mut rows = Vec::new();
    for way in Way::ALL {
        rows.push(match row(known, &base, way, budget) {
            Ok(r) => r,
            Err(
                e @ (Error::NotModelled { .. } | Error::Invalid { .. } | Error::TooLarge { .. }),
            ) => Row {
                way,
                label: way.label(&base),
                points: Vec::new(),
                fewest: None,
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        });
    }
    let mem = fmt_memory(budget);
    // The fewest GPUs, then the least traffic (`Way::ALL`'s order): the first row with the smallest count. CPU
    // offload is offered beside it, not in its place: it needs the host memory named and runs the optimizer on
    // the CPU.
    let fewest = |offload: bool| {
        rows.iter()
            .filter(|r| (r.way == Way::Zero3Offload) == offload)
            .filter_map(|r| r.fewest.as_ref().map(|f| (r.way, f)))
            .min_by_key(|(_, f)| f.gpus)
    };
    let offload_sentence = |f: &Fit| {
        format!(
            "{} with FSDP2's CPU offload ({} per GPU) if each GPU's process can pin {} of host memory for \
             its shard (the optimizer then steps on the CPU: much slower)",
            if f.gpus == 1 {
                "1 GPU fits".to_string()
            } else {
                format!("{} GPUs fit", f.gpus)
            },
            fmt_within(f.device_total_bytes, budget),
            f.host_bytes
                .map_or_else(|| "(not modelled for this optimizer)".to_string(), fmt_bytes)
        )
    };
    let (advice, advised) = match (budget, one_gpu_bytes, fewest(false), fewest(true)) {
        (0, ..) => ("Choose a GPU to see how many of it the step needs.".to_string(), None),
        (_, Some(t), ..) if t <= budget => (
            format!(
                "It fits on one {mem} GPU ({} on the device): more GPUs speed it up but are not needed.",
                fmt_within(t, budget)
            ),
            None,
        ),
        (_, _, Some((way, f)), off) => {
            let mut a = format!(
                "The fewest {mem} GPUs that fit: {} with {} ({} per GPU).",
                f.gpus,
                way.label(&base),
                fmt_within(f.device_total_bytes, budget)
            );
            if let Some((_, o)) = off.filter(|(_, o)| o.gpus < f.gpus) {
                a += &format!(" Fewer: {}.", offload_sentence(o));
            }
            (a, Some(f.setup.clone()))
        }
        (_, _, None, Some((_, o))) => (
            format!(
                "Without offload no data-parallel strategy fits on up to {MAX_GPUS_SEARCHED} GPUs of {mem}; {}.",
                offload_sentence(o)
            ),
            Some(o.setup.clone()),
        ),
        (_, _, None, None) => match rows.iter().find_map(|r| r.error.as_ref()) {
            Some(e) if rows.iter().all(|r| r.error.is_some()) => (
                format!("DDP and FSDP2 are not modelled for this setup ({e}).",),
                None,
            ),
            _ => (
                format!(
                    "No data-parallel strategy fits on up to {MAX_GPUS_SEARCHED} GPUs of {mem}: the activations of \
                     one GPU's batch do not shrink with more GPUs; lower them first (checkpointing, a smaller batch)."
                ),
                None,
            ),
        },
    };
    Ok(Plan {
        budget_bytes: budget,
        one_gpu_bytes,
        rows,
        notes: base.notes,
        advice,
        advised,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    fn llama_70b_on(gpu: &str) -> Setup {
        let mut s = presets::model_preset("llama-3.1-70b").unwrap();
        let g = presets::gpu(gpu).unwrap();
        s.device = g.device();
        s
    }

    /// DDP's per-GPU figure stands for every GPU count (the plan estimates it once): the model agrees.
    #[test]
    fn ddp_does_not_depend_on_the_gpu_count() {
        let b = base(&presets::founding());
        let at = |w| crate::estimate(&Way::Ddp.apply(&b, w)).unwrap();
        let one = at(1);
        for w in [2, 8, 64] {
            let many = at(w);
            assert_eq!(one.peak_allocated_bytes, many.peak_allocated_bytes, "{w}");
            assert_eq!(one.device_total_bytes, many.device_total_bytes, "{w}");
        }
        assert!(one.components.grads_bytes > 0);
    }

    /// Llama-3.1-70B with bf16 autocast and checkpointing on H100 80 GB: one GPU and DDP never fit, nor ZeRO-2,
    /// whose gathered bf16 parameters (2 x 70.6B bytes) stay from the forward to the backward; the other FSDP2
    /// rows run its bf16 policy on fp32 parameters; the fewest GPUs found fit and one step fewer (one GPU, or one
    /// tensor-parallel group of 8) does not, and the advice is the row with the fewest GPUs without offload.
    #[test]
    fn fewest_gpus_are_the_boundary_for_llama_70b() {
        let mut s = llama_70b_on("h100-80");
        s.train.checkpointing = true;
        let p = plan(&s).unwrap();
        let budget = s.device.memory_bytes;
        assert!(p.one_gpu_bytes.unwrap() > budget);
        let b = base(&s);
        for r in &p.rows[..2] {
            assert!(r.way == Way::Ddp || r.way == Way::Zero2);
            assert!(r.fewest.is_none() && r.points.iter().all(|&(_, t)| t > budget));
            assert!(!crate::fits(&r.way.apply(&b, MAX_GPUS_SEARCHED), budget).unwrap());
        }
        for r in &p.rows[2..] {
            let f = r
                .fewest
                .as_ref()
                .unwrap_or_else(|| panic!("{:?} fits nowhere", r.way));
            assert_eq!(f.setup.train.precision, Precision::Fp32);
            assert_eq!(f.setup.train.parallel.param_dtype, Some(Dtype::Bf16));
            assert_eq!(f.setup.train.parallel.reduce_dtype, Some(Dtype::Fp32));
            assert_eq!(f.setup.train.parallel.gpus, f.gpus);
            let unit = r.way.unit(&b);
            assert_eq!(f.setup.train.parallel.tp, unit);
            assert_eq!(f.gpus % unit, 0);
            assert!(f.device_total_bytes <= budget);
            assert_eq!(
                f.device_total_bytes,
                crate::estimate(&f.setup).unwrap().device_total_bytes
            );
            assert!(
                f.gpus == unit || !crate::fits(&r.way.apply(&b, f.gpus - unit), budget).unwrap(),
                "{:?}: {} GPUs fit too",
                r.way,
                f.gpus - unit
            );
        }
        // Tensor parallel 8 with sequence parallel (Llama-3.1-70B: 64 heads, 8 KV heads, 28672, 128256 and 2048
        // all divide by 8) on dp x 8 GPUs; the fewer of it and ZeRO-3 alone is advised (ZeRO-2 fits nowhere); CPU
        // offload, which needs far fewer GPUs here, is named beside it with the host memory it pins.
        assert_eq!(b.tp, Some((8, true)));
        let z3 = p.rows[2].fewest.as_ref().unwrap();
        let tp = p.rows[3].fewest.as_ref().unwrap();
        let off = p.rows[4].fewest.as_ref().unwrap();
        let (best, label) = if tp.gpus < z3.gpus {
            (tp, &p.rows[3].label)
        } else {
            (z3, &p.rows[2].label)
        };
        assert!(off.gpus < best.gpus);
        assert_eq!(p.advised.as_ref(), Some(&best.setup));
        let host = off.host_bytes.unwrap();
        assert!(
            p.advice.starts_with(&format!(
                "The fewest 79.64 GiB GPUs that fit: {} with {label} ({} per GPU). Fewer: ",
                best.gpus,
                fmt_bytes(best.device_total_bytes)
            )) && p
                .advice
                .contains(&format!("can pin {} of host memory", fmt_bytes(host))),
            "{}",
            p.advice
        );
        assert!(p.notes.iter().any(|n| n.contains("MixedPrecisionPolicy")));
    }

    /// The founding case fits its RTX 4070 alone: nothing advised; compiled, so the rows are eager and say so.
    #[test]
    fn one_gpu_that_fits_needs_no_advice() {
        let s = presets::founding();
        let p = plan(&s).unwrap();
        let one = crate::estimate(&s).unwrap().device_total_bytes;
        assert_eq!(p.one_gpu_bytes, Some(one));
        assert!(one <= p.budget_bytes);
        assert!(p.advised.is_none() && p.advice.starts_with("It fits on one"));
        assert!(p.notes.iter().any(|n| n.starts_with("eager figures")));
        // nanoGPT's fused c_attn takes no tensor parallelism: that row says why.
        let tp = &p.rows[3];
        assert_eq!(tp.way, Way::Zero3Tp);
        assert!(tp.points.is_empty());
        assert!(tp.error.as_deref().unwrap().contains("fused c_attn"));
        // fp16 autocast stays autocast under every other way (FSDP2's fp16 policy is not modelled).
        for r in p.rows.iter().filter(|r| r.way != Way::Zero3Tp) {
            assert_eq!(r.points.len(), PLOTTED_GPUS.len(), "{:?}", r.way);
            let f = r.fewest.as_ref().unwrap();
            assert_eq!((f.gpus, f.setup.train.precision), (1, Precision::Fp16Amp));
            assert!(!f.setup.train.compile);
        }
        // ZeRO-3 holds less per GPU on more GPUs.
        let z3 = &p.rows[2].points;
        assert!(z3.windows(2).all(|w| w[1].1 <= w[0].1), "{z3:?}");
    }

    /// A way that is not modelled for the setup is a row with its reason; no memory given, no advice.
    #[test]
    fn rows_say_what_is_not_modelled() {
        let mut s = presets::model_preset("llama-3.2-1b").unwrap();
        s.train.lora = Some(crate::finetune::LoraConfig::with_rank(16));
        s.train.quantization = Some(crate::finetune::Quantization::Nf4 { double_quant: true });
        s.device.memory_bytes = 0;
        let p = plan(&s).unwrap();
        assert!(p.rows.iter().all(|r| r.points.is_empty()
            && r.error
                .as_deref()
                .is_some_and(|e| e.starts_with("not modelled"))));
        assert_eq!(
            p.advice,
            "Choose a GPU to see how many of it the step needs."
        );
    }

    /// LoRA on several GPUs is modelled under DDP and FSDP2 (tests/data/parallel), under autocast on every way;
    /// CPU offload of a LoRA model was not measured and says so. ZeRO-3 holds less per GPU than DDP.
    #[test]
    fn lora_rows_are_modelled_under_autocast() {
        let mut s = presets::model_preset("llama-3.2-1b").unwrap();
        s.train.lora = Some(crate::finetune::LoraConfig::with_rank(16));
        s.device.memory_bytes = 0;
        let p = plan(&s).unwrap();
        let row = |w: Way| p.rows.iter().find(|r| r.way == w).unwrap();
        for w in [Way::Ddp, Way::Zero2, Way::Zero3] {
            assert!(!row(w).points.is_empty(), "{w:?}: {:?}", row(w).error);
            assert_eq!(row(w).error, None);
        }
        let offload = row(Way::Zero3Offload).error.as_deref().unwrap_or_default();
        assert!(
            offload.starts_with("not modelled: train.parallel.offload with train.lora"),
            "{offload}"
        );
        let at = |w: Way, gpus: u64| row(w).points.iter().find(|p| p.0 == gpus).unwrap().1;
        assert!(at(Way::Zero3, 8) < at(Way::Ddp, 8));
        let b = base(&s);
        assert_eq!(Way::Zero3.apply(&b, 8).train.precision, Precision::Bf16Amp);
        assert_eq!(Way::Zero3.apply(&b, 8).train.parallel.param_dtype, None);
    }

    /// Host memory under CPU offload by hand: fp32 AdamW keeps 4 (parameter) + 4 (gradient) + 8 (two moments)
    /// bytes per element of the shard; every row count here is even, so two GPUs hold half each.
    #[test]
    fn offload_host_memory_is_the_shard_of_state() {
        let mut s = crate::input::setup_from_value(&serde_json::json!({
            "model": {"family": "llama", "n_layer": 2, "n_head": 4, "n_embd": 256,
                      "intermediate_size": 512, "vocab_size": 1000, "block_size": 64},
            "train": {"precision": "fp32", "optimizer": "adamw",
                      "parallel": {"strategy": "fsdp", "gpus": 2, "offload": true}}}))
        .unwrap();
        let n = s.model.n_params();
        assert_eq!(offload_host_bytes(&s), Some(n / 2 * 16));
        s.train.parallel.gpus = 1;
        assert_eq!(offload_host_bytes(&s), Some(n * 16));
        s.train.optimizer = Optimizer::Sgd;
        assert_eq!(offload_host_bytes(&s), Some(n * 8));
        s.train.optimizer = Optimizer::AdamW8bit;
        assert_eq!(offload_host_bytes(&s), None);
        s.train.parallel.offload = false;
        s.train.optimizer = Optimizer::AdamW;
        assert_eq!(offload_host_bytes(&s), None);
    }

    /// The row a setup's own strategy is on: each way's setup maps back to it; one GPU and a tensor-parallel
    /// setup are on none.
    #[test]
    fn a_setup_names_its_row() {
        let b = base(&presets::model_preset("llama-3.2-1b").unwrap());
        for way in Way::ALL {
            let expected = (way != Way::Zero3Tp).then_some(way);
            assert_eq!(
                Way::of(&way.apply(&b, 8).train.parallel),
                expected,
                "{way:?}"
            );
        }
        assert_eq!(Way::of(&Parallel::single()), None);
    }
}
