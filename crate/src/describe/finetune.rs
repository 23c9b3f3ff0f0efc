//! Fine-tuning on one GPU (issue 13), as data: LoRA as peft applies it (`LoraConfig`), the dtype the frozen base
//! is loaded in (`base_dtype`), and which of these combinations vramfit models.
//!
//! Facts from `tests/data/finetune/README.md` (peft 0.21.2, transformers 5.24, PyTorch 2.15, measured with
//! PyTorch's own allocator on the stubbed device): `get_peft_model` freezes every base parameter (no `.grad`, no
//! optimizer state) and adds two trainable Linears per adapted module, A (`r x in`) and B (`out x r`), in fp32
//! whatever the base dtype (`autocast_adapter_dtype=True`, peft's default); precision `bf16` (pure) casts the
//! whole model, adapters included, to bf16. `modules_to_save` adds a trainable copy of a module in the base
//! dtype, the frozen original kept.

use crate::error::Error;
use crate::model::{Family, ModelConfig, Setup};
use crate::policy::Precision;

/// The Linears of a Hugging Face decoder layer that LoRA can adapt, by the module names peft's
/// `target_modules` matches (the suffix of each module's qualified name). Phi-3 packs q, k and v into one
/// `qkv_proj` and gate and up into one `gate_up_proj`; peft wraps a packed Linear as any other (its adapter's
/// output, `out = q + k + v` or `2 x intermediate` wide, is added to the packed output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Phi-3's packed `qkv_proj`.
    Qkv,
    /// Phi-3's packed `gate_up_proj`.
    GateUp,
    /// GPT-NeoX's packed `query_key_value` (laid out per head).
    QueryKeyValue,
    /// GPT-NeoX's attention output projection, `dense`.
    Dense,
    /// GPT-NeoX's MLP input, `dense_h_to_4h`.
    DenseHTo4h,
    /// GPT-NeoX's MLP output, `dense_4h_to_h`.
    Dense4hToH,
    /// A mixture of experts' router (`mlp.gate`, experts x C): on Mixtral and OLMoE no `nn.Linear` but a bare
    /// weight, which peft adapts through its `ParamWrapper` (`target_parameters` "gate.weight", the name
    /// `"all-linear"` maps the v4 router `gate` to).
    Router,
    /// Qwen2-MoE's `shared_expert_gate`, a C -> 1 `nn.Linear`.
    SharedExpertGate,
}

impl Role {
    pub const ALL: [Role; 15] = [
        Role::Q,
        Role::K,
        Role::V,
        Role::O,
        Role::Gate,
        Role::Up,
        Role::Down,
        Role::Qkv,
        Role::GateUp,
        Role::QueryKeyValue,
        Role::Dense,
        Role::DenseHTo4h,
        Role::Dense4hToH,
        Role::Router,
        Role::SharedExpertGate,
    ];
    pub const NAMES: &'static [&'static str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "gate_up_proj",
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "gate",
        "shared_expert_gate",
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// The Linears of one decoder layer of `m`'s family in the order its modules are created, which is the
    /// order peft wraps them and makes their adapters (transformers 5.24: `Phi3Attention` creates `o_proj`
    /// before `qkv_proj`; the records' resolved `target_modules`).
    ///
    /// A mixture of experts (transformers 5.24, peft 0.21.2; tests/data/finetune/README.md, mixtures of experts):
    /// Qwen2-MoE's Linears are the attention's, its shared expert's `gate_proj`, `up_proj`, `down_proj` and
    /// `shared_expert_gate` (the routed experts are fused parameters no target reaches). Mixtral's and OLMoE's are
    /// the attention's, and `"all-linear"` also sets peft's `target_parameters` to the router's weight (`gate`)
    /// and the fused experts' `gate_up_proj` and `down_proj` (`_convert_peft_config_moe`, which maps the v4
    /// expert names there), wrapped by peft's `ParamWrapper` after the attention's Linears, router first.
    pub fn of_layer(m: &ModelConfig) -> &'static [Role] {
        let arch = crate::arch::Arch::of(m, crate::policy::Attention::Sdpa);
        if let crate::arch::Mlp::Moe(moe) = arch.mlp {
            return if moe.shared_expert {
                &[
                    Role::Q,
                    Role::K,
                    Role::V,
                    Role::O,
                    Role::Gate,
                    Role::Up,
                    Role::Down,
                    Role::SharedExpertGate,
                ]
            } else {
                &[
                    Role::Q,
                    Role::K,
                    Role::V,
                    Role::O,
                    Role::Router,
                    Role::GateUp,
                    Role::Down,
                ]
            };
        }
        match (arch.qkv, arch.packed_gate_up) {
            (crate::arch::Qkv::PackedSlices, true) => {
                &[Role::O, Role::Qkv, Role::GateUp, Role::Down]
            }
            (crate::arch::Qkv::PackedHeads, _) => &[
                Role::QueryKeyValue,
                Role::Dense,
                Role::DenseHTo4h,
                Role::Dense4hToH,
            ],
            // q, k, v, o, gate, up, down: the first seven of `ALL`.
            _ => &Role::ALL[..7],
        }
    }
}

/// Which Linears carry an adapter: a set of `Role`s. peft's `"all-linear"` is every Linear but the output
/// layer (the records' resolved configs list the seven names of a Llama layer, the four of a Phi-3 layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets(u16);

impl Targets {
    pub const ALL_LINEAR: Targets = Targets(0x7fff);
    /// The seven Linears of a Llama-style layer, which is `"all-linear"` there.
    const SEPARATE: u16 = 0x7f;

    /// `target_modules` as peft takes it: `"all-linear"`, or module names.
    ///
    /// # Errors
    /// A name that is not a Linear of these decoder layers (peft raises "Target modules ... not found in the
    /// base model"), or an empty list.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Targets, Error> {
        let mut bits = 0u16;
        for n in names {
            if n == "all-linear" {
                bits |= Self::ALL_LINEAR.0;
                continue;
            }
            match Role::ALL.iter().find(|r| r.name() == n) {
                Some(r) => bits |= r.bit(),
                None => {
                    return Err(Error::invalid(
                        "train.lora.target_modules",
                        format!("{n:?}"),
                        format!(
                            "is not a Linear of a Hugging Face decoder layer vramfit adapts; use \"all-linear\" \
                             or some of {}",
                            Role::NAMES.join(", ")
                        ),
                    ))
                }
            }
        }
        if bits == 0 {
            return Err(Error::invalid(
                "train.lora.target_modules",
                "[]",
                "names no module; use \"all-linear\" or module names such as q_proj, v_proj",
            ));
        }
        Ok(Targets(bits))
    }

    pub fn has(self, r: Role) -> bool {
        self.0 & r.bit() != 0
    }

    /// The names, `["all-linear"]` for every Linear.
    pub fn names(self) -> Vec<&'static str> {
        if self == Self::ALL_LINEAR || self.0 == Self::SEPARATE {
            return vec!["all-linear"];
        }
        Role::ALL
            .iter()
            .filter(|r| self.has(**r))
            .map(|r| r.name())
            .collect()
    }
}

/// peft's `LoraConfig`, as far as it moves bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank: A is `r x in`, B is `out x r`.
    pub r: u64,
    /// `lora_alpha`: the scaling `alpha / r` multiplies B's output (a Python scalar: no tensor).
    pub alpha: f64,
    /// `lora_dropout`: above 0, every adapted Linear makes and keeps a dropped-out copy of its input's mask.
    pub dropout: f64,
    pub targets: Targets,
    /// `modules_to_save` holds `lm_head`: a trainable copy of the head in the base dtype.
    pub save_head: bool,
    /// `modules_to_save` holds `embed_tokens`: a trainable copy of the embedding in the base dtype.
    pub save_embed: bool,
}

impl LoraConfig {
    pub const MODULES_TO_SAVE: &'static [&'static str] = &["lm_head", "embed_tokens"];

    /// A config with peft's usual choices: `lora_alpha` = 2r, dropout 0.05, every Linear.
    pub fn with_rank(r: u64) -> LoraConfig {
        LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            dropout: 0.05,
            targets: Targets::ALL_LINEAR,
            save_head: false,
            save_embed: false,
        }
    }

    /// `modules_to_save` as names.
    pub fn modules_to_save(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.save_head {
            v.push("lm_head");
        }
        if self.save_embed {
            v.push("embed_tokens");
        }
        v
    }

    /// Reads `modules_to_save` names.
    ///
    /// # Errors
    /// A module vramfit does not model as trainable (only the head and the embedding are).
    pub fn set_modules_to_save<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Error> {
        for n in names {
            match n {
                "lm_head" => self.save_head = true,
                "embed_tokens" => self.save_embed = true,
                _ => {
                    return Err(Error::invalid(
                        "train.lora.modules_to_save",
                        format!("{n:?}"),
                        "is not modelled; vramfit trains copies of lm_head and embed_tokens",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Whether peft's LoRA reaches `m`'s fused experts and router through its `ParamWrapper` (Mixtral, OLMoE:
/// `Role::of_layer` lists `Role::Router`; Qwen2-MoE's routed experts stay out of reach).
pub fn param_wrapped(m: &ModelConfig) -> bool {
    Role::of_layer(m).contains(&Role::Router)
}

/// Bytes per block of the experts' weights merged with their LoRA adapters that peft's `ParamWrapper` makes in
/// each forward and `_grouped_mm` saves to the backward (`moe::Wrapped`): `gate_up_proj` [E, 2I, C] and
/// `down_proj` [E, C, I] where adapted, in the experts' dtype (the base's; fp32 on a quantized base). 0 without.
pub fn merged_expert_bytes(setup: &Setup) -> u64 {
    let m = &setup.model;
    let Some(l) = &setup.train.lora else {
        return 0;
    };
    if !param_wrapped(m) {
        return 0;
    }
    let per = m.n_experts * m.n_embd * m.intermediate_size;
    let elems = u64::from(l.targets.has(Role::GateUp)) * 2 * per
        + u64::from(l.targets.has(Role::Down)) * per;
    elems * base_bytes(setup)
}

/// The adapters peft adds, as (rows, cols), in the order it creates them: layer by layer, each adapted Linear
/// in module order (`Role::of_layer`: q, k, v, o, gate, up, down; Phi-3's o, qkv, gate_up, down), A (`r x in`)
/// then B (`out x r`).
///
/// A `ParamWrapper` on a fused expert parameter [E, out, in] (Mixtral, OLMoE) makes one A [E r, in] and one B
/// [out, E r] for all E experts (`ParamWrapper.update_layer`: `nn.Linear(in, r * num_experts)` and
/// `nn.Linear(r * num_experts, out)`); for `gate_up_proj` `"all-linear"` doubles the rank and alpha (peft's
/// `rank_pattern`/`alpha_pattern` for the fused w1 and w3: the scaling stays alpha / r). On the router's
/// [E, C] weight it is an ordinary pair, A [r, C], B [E, r]. (The records' trainable parameters: 243,776 for
/// the two layers of mixtral-lora-r8-all-bf16amp.)
pub fn adapter_shapes(m: &ModelConfig, lora: &LoraConfig) -> Vec<(u64, u64)> {
    let (c, qd, kv, i) = (m.n_embd, m.q_dim(), m.kv_dim(), m.intermediate_size);
    let (e, r) = (m.n_experts, lora.r);
    let moe = matches!(
        crate::arch::Arch::of(m, crate::policy::Attention::Sdpa).mlp,
        crate::arch::Mlp::Moe(_)
    );
    let wrapped = param_wrapped(m);
    // (in, out, rank) of each adapter pair.
    let shape = |role: Role| match role {
        Role::Q => (c, qd, r),
        Role::K | Role::V => (c, kv, r),
        Role::O => (qd, c, r),
        // The fused experts (Mixtral, OLMoE): all E experts' ranks side by side.
        Role::GateUp if wrapped => (c, 2 * i, 2 * r * e),
        Role::Down if wrapped => (i, c, r * e),
        // Qwen2-MoE's shared expert.
        Role::Gate | Role::Up if moe => (c, m.shared_expert_size, r),
        Role::Down if moe => (m.shared_expert_size, c, r),
        Role::Gate | Role::Up => (c, i, r),
        Role::Down => (i, c, r),
        Role::Qkv | Role::QueryKeyValue => (c, qd + 2 * kv, r),
        Role::GateUp => (c, 2 * i, r),
        Role::Dense => (qd, c, r),
        Role::DenseHTo4h => (c, i, r),
        Role::Dense4hToH => (i, c, r),
        Role::Router => (c, e, r),
        Role::SharedExpertGate => (c, 1, r),
    };
    let mut v = Vec::new();
    for _ in 0..m.n_layer {
        for role in Role::of_layer(m).iter().filter(|r| lora.targets.has(**r)) {
            let (in_f, out_f, rank) = shape(*role);
            v.extend([(rank, in_f), (out_f, rank)]);
        }
    }
    v
}

/// Trainable parameters under LoRA: the adapters and the `modules_to_save` copies.
pub fn trainable_params(m: &ModelConfig, lora: &LoraConfig) -> u64 {
    let table = m.vocab_size * m.n_embd;
    adapter_shapes(m, lora)
        .iter()
        .map(|(r, c)| r * c)
        .sum::<u64>()
        + table * (u64::from(lora.save_head) + u64::from(lora.save_embed))
}

/// The usual fine-tuning recipes by name: `train.finetune.method` in the setup JSON, `--finetune` on the command
/// line, and the page's side-by-side comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Every parameter trained, in the setup's precision.
    Full,
    /// peft's LoRA over a frozen base loaded in the autocast dtype (`torch_dtype=torch.bfloat16` under bf16
    /// autocast, the Hugging Face fine-tuning scripts' usual load), adapters fp32.
    Lora,
    /// LoRA over a bitsandbytes base: 4-bit NF4 with double quantization and bf16 compute (the QLoRA paper's
    /// `BitsAndBytesConfig`), through `prepare_model_for_kbit_training`, which turns gradient checkpointing on.
    Qlora,
}

impl Method {
    pub const NAMES: &'static [&'static str] = &["full", "lora", "qlora"];
    pub const ALL: [Method; 3] = [Method::Full, Method::Lora, Method::Qlora];
    /// QLoRA's base and compute: NF4 with double quantization under bf16 autocast (with checkpointing).
    pub const QLORA_QUANT: Quantization = Quantization::Nf4 { double_quant: true };
    pub const QLORA_PRECISION: Precision = Precision::Bf16Amp;

    /// # Errors
    /// A name not in [`Method::NAMES`], reported as `field`.
    pub fn parse(s: &str, field: &str) -> Result<Method, Error> {
        match s {
            "full" => Ok(Method::Full),
            "lora" => Ok(Method::Lora),
            "qlora" => Ok(Method::Qlora),
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

    /// The recipe a setup follows: a quantized base is QLoRA, adapters alone LoRA, neither full fine-tuning.
    pub fn of(setup: &Setup) -> Method {
        match (&setup.train.lora, setup.train.quantization) {
            (Some(_), Some(_)) => Method::Qlora,
            (Some(_), None) => Method::Lora,
            (None, _) => Method::Full,
        }
    }

    /// The recipe's adapters: r 16, alpha 32, dropout 0.05 on every Linear (`LoraConfig::with_rank(16)`).
    pub fn adapters() -> LoraConfig {
        LoraConfig::with_rank(16)
    }

    /// The recipe's adapters for `m`: `adapters()`, without dropout where `"all-linear"` reaches peft's
    /// `ParamWrapper` (Mixtral, OLMoE), which raises "lora.ParamWrapper does not work with lora_dropout != 0"
    /// (peft 0.21.2, `ParamWrapper.__init__`).
    pub fn adapters_for(m: &ModelConfig) -> LoraConfig {
        let mut l = Self::adapters();
        if param_wrapped(m) {
            l.dropout = 0.0;
        }
        l
    }

    /// The base's dtype the LoRA recipe loads under `precision`: the autocast (or pure) 2-byte dtype, fp32
    /// under fp32.
    pub fn lora_base_dtype(precision: Precision) -> Option<BaseDtype> {
        match precision {
            Precision::Bf16Amp | Precision::Bf16 => Some(BaseDtype::Bf16),
            Precision::Fp16Amp => Some(BaseDtype::Fp16),
            Precision::Fp32 => None,
        }
    }

    /// `setup` turned into this recipe for a side-by-side comparison: the setup's own adapters (and base
    /// dtype, quantization) where it already has them, the recipe's otherwise. LoRA and QLoRA run eager (peft
    /// under torch.compile is not modelled); QLoRA under bf16 autocast with checkpointing, as the recipe runs.
    pub fn apply(self, setup: &Setup) -> Setup {
        let mut s = setup.clone();
        let t = &mut s.train;
        let own = Method::of(setup);
        match self {
            Method::Full => {
                t.lora = None;
                t.quantization = None;
                t.base_dtype = None;
            }
            Method::Lora => {
                if own != Method::Lora {
                    t.lora = Some(
                        t.lora
                            .clone()
                            .unwrap_or_else(|| Method::adapters_for(&s.model)),
                    );
                    t.quantization = None;
                    t.base_dtype = Method::lora_base_dtype(t.precision);
                }
                t.compile = false;
            }
            Method::Qlora => {
                if own != Method::Qlora {
                    t.lora = Some(
                        t.lora
                            .clone()
                            .unwrap_or_else(|| Method::adapters_for(&s.model)),
                    );
                    t.quantization = Some(Method::QLORA_QUANT);
                    t.base_dtype = None;
                    t.precision = Method::QLORA_PRECISION;
                    t.checkpointing = true;
                }
                t.compile = false;
            }
        }
        s
    }
}

/// The dtype the frozen base model is loaded in (`torch_dtype` / `dtype` of `from_pretrained`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseDtype {
    Fp32,
    Bf16,
    Fp16,
}

impl BaseDtype {
    pub const NAMES: &'static [&'static str] = &["fp32", "bf16", "fp16"];

    pub fn parse(s: &str) -> Result<BaseDtype, Error> {
        match s {
            "fp32" => Ok(BaseDtype::Fp32),
            "bf16" => Ok(BaseDtype::Bf16),
            "fp16" => Ok(BaseDtype::Fp16),
            _ => Err(Error::UnknownValue {
                field: "train.base_dtype".into(),
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
            BaseDtype::Fp32 => 4,
            BaseDtype::Bf16 | BaseDtype::Fp16 => 2,
        }
    }
}

/// The base's Linears quantized by bitsandbytes (transformers' `BitsAndBytesConfig`): `Linear4bit` (NF4 or FP4,
/// `bnb_4bit_use_double_quant`) or `Linear8bitLt` (`load_in_8bit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Nf4 { double_quant: bool },
    Fp4 { double_quant: bool },
    Int8,
}

impl Quantization {
    pub const NAMES: &'static [&'static str] = &["nf4", "fp4", "int8"];

    /// `train.quantization` with `train.double_quant` (4-bit only).
    ///
    /// # Errors
    /// An unknown name, or double quantization asked of an 8-bit base.
    pub fn parse(s: &str, double_quant: bool) -> Result<Quantization, Error> {
        match s {
            "nf4" => Ok(Quantization::Nf4 { double_quant }),
            "fp4" => Ok(Quantization::Fp4 { double_quant }),
            "int8" if double_quant => Err(Error::invalid(
                "train.double_quant",
                true,
                "applies to 4-bit bases (nf4, fp4); int8 has none",
            )),
            "int8" => Ok(Quantization::Int8),
            _ => Err(Error::UnknownValue {
                field: "train.quantization".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantization::Nf4 { .. } => "nf4",
            Quantization::Fp4 { .. } => "fp4",
            Quantization::Int8 => "int8",
        }
    }

    pub fn double_quant(self) -> bool {
        matches!(
            self,
            Quantization::Nf4 { double_quant: true } | Quantization::Fp4 { double_quant: true }
        )
    }

    /// How the report names it: "4-bit NF4 with double quantization", "8-bit (LLM.int8)".
    pub fn describe(self) -> String {
        match self {
            Quantization::Int8 => "8-bit (LLM.int8)".into(),
            q => format!(
                "4-bit {}{}",
                q.name().to_ascii_uppercase(),
                if q.double_quant() {
                    " with double quantization"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Elements per quantization block of bitsandbytes' 4-bit weights (`Params4bit.blocksize`, 64 in 0.50.2: the
/// records' `quant_state.blocksize`).
const BLOCK_4BIT: u64 = 64;
/// Blocks of absmax per block of the double quantization's second level (`quant_state.state2.blocksize`, 256).
const BLOCK_NESTED: u64 = 256;

/// The tensors bitsandbytes keeps on the device for one 4-bit Linear weight of `elems` elements, in bytes, in the
/// order `quantize_4bit` makes them (tests/data/finetune/README.md, Linear4bit storage; the records'
/// `quant_state`): the packed weight uint8 [(elems+1)/2]; without double quantization the absmax fp32 per block
/// of 64; with it the absmax quantized to uint8 per block, its own absmax fp32 per 256 of those, the 256-entry
/// fp32 code of that level and the fp32 `offset` scalar; and the 16-entry fp32 code table of NF4 or FP4.
pub fn linear4bit_tensors(elems: u64, double_quant: bool) -> Vec<u64> {
    let blocks = elems.div_ceil(BLOCK_4BIT);
    let mut v = vec![elems.div_ceil(2)];
    if double_quant {
        v.extend([blocks, blocks.div_ceil(BLOCK_NESTED) * 4, 256 * 4, 4]);
    } else {
        v.push(blocks * 4);
    }
    v.push(16 * 4);
    v
}

/// The tensors bitsandbytes keeps on the device for one `Linear8bitLt` weight (`Int8Params`, `has_fp16_weights=False`)
/// of `elems` elements in `rows` output rows, in bytes, in the order `int8_vectorwise_quant` makes them (0.50.2,
/// `backends/cuda/ops.py`; the stub-cuda snapshot of `llama-int8-r16-qv-bf16amp` and the records' `quant_state`):
/// the row scales `SCB` fp32 [rows], then the int8 weight `CB` [rows, cols] (the parameter's data).
pub fn int8_tensors(elems: u64, rows: u64) -> Vec<u64> {
    vec![rows * 4, elems]
}

/// What LLM.int8()'s outlier columns would add at most to an 8-bit base's step, in bytes: the measurements ran
/// on a stub GPU whose activations read as zeros, so no input column reached `llm_int8_threshold` (6.0) and the
/// estimate is the no-outlier case. On real activations `MatMul8bitLt` copies each outlier column of its input
/// (`subA`, n x outliers in the input's dtype) and keeps it in `ctx.tensors` until the graph is freed, like the
/// input itself; the weight columns it dequantizes and the extra GEMM's output are transient. The bound takes every
/// column as an outlier: one more copy of every 8-bit Linear's input (each projection its own, q/k/v of the same
/// input included), for `tokens` tokens of a pre-norm decoder whose stream is fp32 after
/// prepare_model_for_kbit_training (q, k, v, gate and up, or Phi-3's packed qkv and gate_up, read the fp32 norm
/// outputs, down the fp32 product of their fp32 outputs) and whose attention output reaches o_proj in the compute
/// dtype (`compute_bytes`). Real runs see a handful of outlier features in large models (the LLM.int8() paper),
/// far below this.
pub fn int8_outlier_bound_bytes(m: &ModelConfig, tokens: u64, compute_bytes: u64) -> u64 {
    // A mixture of experts' router and fused experts are no `nn.Linear` (not quantized); Qwen2-MoE's shared
    // expert is.
    let wrapped = param_wrapped(m);
    let mlp_width = if m.n_experts > 0 {
        m.shared_expert_size
    } else {
        m.intermediate_size
    };
    let per_layer: u64 = Role::of_layer(m)
        .iter()
        .map(|r| match r {
            Role::Router | Role::GateUp | Role::Down if wrapped => 0,
            Role::O | Role::Dense => m.q_dim() * compute_bytes,
            Role::Down | Role::Dense4hToH => mlp_width * 4,
            _ => m.n_embd * 4,
        })
        .sum();
    m.n_layer * tokens * per_layer
}

/// The fp32 temporaries `dequantize_4bit` makes before the weight itself under double quantization: the absmax
/// dequantized from uint8 (fp32 per block) and `absmax + offset` (fp32 per block); none without.
pub fn dequant_absmax_bytes(elems: u64, double_quant: bool) -> Option<u64> {
    double_quant.then(|| elems.div_ceil(BLOCK_4BIT) * 4)
}

/// Bytes per element of the base model's weights: `base_dtype` when set, bf16 under pure bf16, else fp32 (the
/// four precisions' own meaning).
///
/// A quantized base is fp32 in every parameter that is not a quantized Linear weight: peft's
/// `prepare_model_for_kbit_training` casts every fp16 or bf16 parameter left (embeddings, norms, head) to fp32.
pub fn base_bytes(setup: &Setup) -> u64 {
    if setup.train.quantization.is_some() {
        return 4;
    }
    match setup.train.base_dtype {
        Some(d) => d.bytes(),
        None => setup.train.precision.param_bytes(),
    }
}

/// Bytes per element of LoRA's adapters, their gradients and (AdamW, SGD) optimizer state: fp32 (peft's
/// `autocast_adapter_dtype`), bf16 under pure bf16 (the whole PeftModel cast after wrapping).
pub fn adapter_bytes(precision: Precision) -> u64 {
    precision.param_bytes()
}

/// The families LoRA is modelled for, in the refusal's order.
pub const LORA_FAMILIES: &[Family] = &[
    Family::Llama,
    Family::Mistral,
    Family::Qwen2,
    Family::Qwen3,
    Family::Gemma,
    Family::Gemma2,
    Family::Gemma3,
    Family::Phi3,
    Family::Olmo2,
    Family::GptNeox,
    Family::Mixtral,
    Family::Qwen2Moe,
    Family::Olmoe,
];

/// The fine-tuning combinations vramfit models; every other one is refused by name.
///
/// # Errors
/// An invalid LoRA field (rank, dropout), a base dtype that contradicts the precision, or `NotModelled` for a
/// family, `torch.compile` or a tied head with a trainable copy, which were not measured.
pub fn check(setup: &Setup) -> Result<(), Error> {
    let t = &setup.train;
    let m = &setup.model;
    if let Some(q) = t.quantization {
        if t.lora.is_none() {
            return Err(Error::NotModelled {
                what: format!(
                    "train.quantization ({}) without train.lora: a quantized base cannot be trained itself; \
                     set train.lora (QLoRA)",
                    q.name()
                ),
            });
        }
        // HF's eager attention on an fp32 v (a 4-bit base's Linear on the fp32 stream) is not walked; SDPA is.
        if t.attention == crate::policy::Attention::Manual {
            return Err(Error::NotModelled {
                what: format!(
                    "train.quantization ({}) with train.attention \"manual\": QLoRA is modelled with SDPA, as it \
                     was measured",
                    q.name()
                ),
            });
        }
        // A 4-bit base computes in bf16 (`bnb_4bit_compute_dtype`) and its records ran bf16 autocast; an 8-bit
        // base computes in fp16 whatever the autocast dtype, and was measured under both autocasts.
        let measured = match q {
            Quantization::Int8 => matches!(t.precision, Precision::Bf16Amp | Precision::Fp16Amp),
            _ => t.precision == Precision::Bf16Amp,
        };
        if !measured {
            return Err(Error::NotModelled {
                what: format!(
                    "train.quantization ({}) with train.precision ({}): {}, as it was measured",
                    q.name(),
                    t.precision.name(),
                    match q {
                        Quantization::Int8 =>
                            "an 8-bit base is modelled under bf16-amp or fp16-amp",
                        _ => "QLoRA is modelled under bf16-amp (compute dtype bf16)",
                    }
                ),
            });
        }
    }
    if let Some(d) = t.base_dtype {
        let Some(_) = &t.lora else {
            return Err(Error::NotModelled {
                what: format!(
                    "train.base_dtype ({}) without train.lora: a base in {} with every parameter trained is not \
                     measured; set train.lora, or train.precision \"bf16\" for bf16 weights throughout",
                    d.name(),
                    d.name()
                ),
            });
        };
        let ok = match (t.precision, d) {
            (_, BaseDtype::Fp32) => t.precision != Precision::Bf16,
            (Precision::Bf16Amp | Precision::Bf16, BaseDtype::Bf16) => true,
            (Precision::Fp16Amp, BaseDtype::Fp16) => true,
            _ => false,
        };
        if !ok {
            return Err(Error::NotModelled {
                what: format!(
                    "train.base_dtype ({}) with train.precision ({}): vramfit models an fp32 base under fp32 or \
                     either autocast, a bf16 base under bf16-amp or bf16, an fp16 base under fp16-amp",
                    d.name(),
                    t.precision.name()
                ),
            });
        }
    }
    let Some(l) = &t.lora else {
        if t.optimizer == crate::policy::Optimizer::Adafactor {
            return Err(Error::NotModelled {
                what: "train.optimizer \"adafactor\" without train.lora: its factored state needs every \
                       parameter's shape, which vramfit keeps for LoRA's adapters only"
                    .into(),
            });
        }
        return Ok(());
    };
    if l.r == 0 || l.r > m.n_embd {
        return Err(Error::invalid(
            "train.lora.r",
            l.r,
            format!("must be between 1 and model.n_embd ({})", m.n_embd),
        ));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(Error::invalid(
            "train.lora.dropout",
            l.dropout,
            "must be in [0, 1)",
        ));
    }
    if !l.alpha.is_finite() {
        return Err(Error::invalid(
            "train.lora.alpha",
            l.alpha,
            "must be a number",
        ));
    }
    // Families whose Linears and norms the LoRA executor walks (each measured: tests/data/finetune).
    if !LORA_FAMILIES.contains(&m.family) {
        return Err(Error::NotModelled {
            what: format!(
                "train.lora on {}: LoRA is modelled for Hugging Face families {}",
                m.family.name(),
                LORA_FAMILIES
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    // peft raises "Target modules {...} not found in the base model" when no module of the model matches.
    let layer = Role::of_layer(m);
    if !layer.iter().any(|r| l.targets.has(*r)) {
        return Err(Error::invalid(
            "train.lora.target_modules",
            l.targets.names().join(", "),
            format!(
                "names no Linear of a {} layer, whose Linears are {} (peft's default for the Llama-style \
                 families is q_proj, v_proj)",
                m.family.name(),
                layer.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if m.n_experts > 0 {
        check_moe(m, l)?;
    }
    if t.compile {
        return Err(Error::NotModelled {
            what: "train.lora with torch.compile (train.compile): peft's adapters under Inductor are not traced; \
                   eager is modelled"
                .into(),
        });
    }
    if m.tie_embeddings && (l.save_head || l.save_embed) {
        return Err(Error::NotModelled {
            what: "train.lora.modules_to_save with a tied head (model.tie_embeddings): a trainable copy of a \
                   shared weight was not measured; untied models are"
                .into(),
        });
    }
    Ok(())
}

/// LoRA on a mixture of experts, as peft 0.21.2 wraps it (tests/data/finetune/README.md, mixtures of experts).
///
/// # Errors
/// Dropout on a `ParamWrapper` target (peft raises), or targets without an attention projection (the first
/// block's experts would then run without an input gradient, which was not measured).
fn check_moe(m: &ModelConfig, l: &LoraConfig) -> Result<(), Error> {
    let wrapped: Vec<&str> = [Role::Router, Role::GateUp, Role::Down]
        .iter()
        .filter(|r| param_wrapped(m) && l.targets.has(**r))
        .map(|r| r.name())
        .collect();
    if l.dropout > 0.0 && !wrapped.is_empty() {
        return Err(Error::invalid(
            "train.lora.dropout",
            l.dropout,
            format!(
                "must be 0 when the adapters reach {}'s router or fused experts ({}, which \"all-linear\" \
                 includes): peft's ParamWrapper raises \"does not work with lora_dropout != 0\"; or target the \
                 attention only (q_proj, k_proj, v_proj, o_proj)",
                m.family.name(),
                wrapped.join(", ")
            ),
        ));
    }
    if ![Role::Q, Role::K, Role::V, Role::O]
        .iter()
        .any(|r| l.targets.has(*r))
    {
        return Err(Error::NotModelled {
            what: format!(
                "train.lora.target_modules ({}) on {} without an attention projection (q_proj, k_proj, v_proj,                  o_proj): a mixture of experts whose first block's input needs no gradient was not measured",
                l.targets.names().join(", "),
                m.family.name()
            ),
        });
    }
    Ok(())
}

/// Fine-tuning on several GPUs (`train.parallel`): LoRA on a plain (fp32, bf16 or fp16) base under DDP or
/// FSDP2 is modelled, as measured (tests/data/parallel: peft's adapters under DDP on 2 GPUs and FSDP2 on 2 and 8,
/// resharded or not, checkpointed or not); what was not measured is refused by name.
///
/// # Errors
/// `NotModelled` for a quantized base, `modules_to_save`, FSDP2's mixed precision policy or CPU offload with
/// LoRA on more than one GPU (tensor parallelism with LoRA is refused by `Parallel::check_model`).
pub fn check_parallel(setup: &Setup) -> Result<(), Error> {
    let t = &setup.train;
    let p = &t.parallel;
    let strategy = p.strategy.name();
    if p.strategy == crate::parallel::Strategy::Single {
        return Ok(());
    }
    let refuse = |what: String| Err(Error::NotModelled { what });
    if let Some(q) = t.quantization {
        return refuse(format!(
            "train.quantization ({}) with train.parallel.strategy {strategy:?}: a bitsandbytes base on several \
             GPUs was not measured; LoRA on a plain base (train.base_dtype fp32, bf16 or fp16) is modelled under \
             ddp and fsdp",
            q.name()
        ));
    }
    let Some(l) = &t.lora else {
        return Ok(());
    };
    if setup.model.n_experts > 0 {
        return refuse(format!(
            "train.lora on {} with train.parallel.strategy {strategy:?}: LoRA on a mixture of experts was measured \
             on one GPU only",
            setup.model.family.name()
        ));
    }
    if l.save_head || l.save_embed {
        return refuse(format!(
            "train.lora.modules_to_save ({}) with train.parallel.strategy {strategy:?}: a trainable copy of the \
             head or embedding on several GPUs was not measured; adapters alone are",
            l.modules_to_save().join(", ")
        ));
    }
    if let Some(d) = p.param_dtype {
        return refuse(format!(
            "train.parallel.mixed_precision.param_dtype ({:?}) with train.lora: FSDP2's MixedPrecisionPolicy over \
             a frozen base is not modelled; LoRA under autocast (train.precision \"bf16-amp\") with fsdp is, and \
             was measured to allocate as much (llama-lora-fsdp-w8-mp 351.96 MiB, llama-lora-fsdp-w8 354.89 MiB)",
            d.name()
        ));
    }
    if p.offload {
        return refuse(
            "train.parallel.offload with train.lora: CPU offload of a LoRA model was not measured; fsdp without \
             it is"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page's fine-tuning fieldset is shown for the families its `data-families` lists (www/index.html, written
    /// by hand): it must name exactly the families LoRA is modelled for, or the page hides a knob the core accepts
    /// or shows one it refuses.
    #[test]
    fn the_pages_fine_tuning_section_lists_the_lora_families() {
        let html = include_str!("../../../www/index.html");
        let tag = html
            .lines()
            .find(|l| l.contains("<fieldset id=\"finetune\""))
            .expect("the page's fine-tuning fieldset");
        let listed = tag
            .split("data-families=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("its data-families");
        let mut page: Vec<&str> = listed.split_whitespace().collect();
        let mut core: Vec<&str> = LORA_FAMILIES.iter().map(|f| f.name()).collect();
        page.sort_unstable();
        core.sort_unstable();
        assert_eq!(page, core);
    }

    /// LoRA on several GPUs: modelled under DDP and FSDP2 on a plain base; what was not measured is refused by
    /// name, with the reason.
    #[test]
    fn lora_on_several_gpus_refuses_what_was_not_measured() {
        let e = |train: serde_json::Value| {
            let s = crate::input::setup_from_value(&serde_json::json!({
                "model": {"family": "llama", "n_layer": 2, "n_head": 4, "n_embd": 256,
                          "intermediate_size": 512, "vocab_size": 1000, "block_size": 64},
                "train": train}))?;
            s.validate()
        };
        let lora = |par: serde_json::Value| {
            serde_json::json!({"precision": "bf16-amp", "base_dtype": "bf16",
                               "lora": {"r": 16, "target_modules": "all-linear"}, "parallel": par})
        };
        for par in [
            serde_json::json!({"strategy": "ddp", "gpus": 2}),
            serde_json::json!({"strategy": "fsdp", "gpus": 8, "reshard_after_forward": false}),
        ] {
            assert_eq!(
                e(lora(par.clone())).map_err(|e| e.to_string()),
                Ok(()),
                "{par}"
            );
        }
        let mut q = lora(serde_json::json!({"strategy": "fsdp", "gpus": 8}));
        q["quantization"] = "nf4".into();
        assert!(e(q).unwrap_err().to_string().starts_with(
            "not modelled: train.quantization (nf4) with train.parallel.strategy \"fsdp\""
        ));
        let mut save = lora(serde_json::json!({"strategy": "ddp", "gpus": 2}));
        save["lora"]["modules_to_save"] = serde_json::json!(["lm_head"]);
        assert!(e(save).unwrap_err().to_string().starts_with(
            "not modelled: train.lora.modules_to_save (lm_head) with train.parallel.strategy"
        ));
        let off = lora(serde_json::json!({"strategy": "fsdp", "gpus": 8, "offload": true}));
        assert!(e(off)
            .unwrap_err()
            .to_string()
            .starts_with("not modelled: train.parallel.offload with train.lora"));
    }

    #[test]
    fn targets_read_peft_names_and_all_linear() {
        let t = Targets::parse(["q_proj", "v_proj"]).unwrap();
        assert!(t.has(Role::Q) && t.has(Role::V) && !t.has(Role::K));
        assert_eq!(t.names(), ["q_proj", "v_proj"]);
        assert_eq!(Targets::parse(["all-linear"]).unwrap(), Targets::ALL_LINEAR);
        assert_eq!(Targets::ALL_LINEAR.names(), ["all-linear"]);
        let e = Targets::parse(["lm_head"]).unwrap_err().to_string();
        assert!(
            e.starts_with("train.lora.target_modules (\"lm_head\")"),
            "{e}"
        );
        assert!(Targets::parse([]).is_err());
    }

    /// llama's 4 layers of the records (512 wide, q 512, MLP 1536) at 2048 tokens under bf16 autocast: per layer
    /// (5 x 512 + 1536) x 4 + 512 x 2 = 17,408 bytes a token, 142,606,336 in all (136 MiB).
    #[test]
    fn int8_outliers_at_most_copy_every_input() {
        let mut m = crate::presets::model_preset("llama-3.2-1b").unwrap().model;
        (
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.n_kv_head,
            m.intermediate_size,
            m.head_dim,
        ) = (4, 512, 8, 4, 1536, 0);
        assert_eq!(int8_outlier_bound_bytes(&m, 2048, 2), 142_606_336);
    }

    /// A preset's model as the measured records shrink it: 4 layers, 512 wide, 8 heads of 64 (as many KV heads), an
    /// MLP `mlp` wide.
    fn four_layers_of(preset: &str, mlp: u64) -> crate::model::ModelConfig {
        let mut m = crate::presets::model_preset(preset).unwrap().model;
        (
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.n_kv_head,
            m.intermediate_size,
            m.head_dim,
        ) = (4, 512, 8, 8, mlp, 0);
        m
    }

    /// A Phi-3 layer of phi3-lora-r16-all-bf16amp (512 wide, 8 heads of 64, MLP 1536): peft's four Linears in
    /// module order, o_proj first, and the record's 557,056 trainable parameters: per layer 16 x ((512 + 512) +
    /// (512 + 1536) + (512 + 3072) + (1536 + 512)). The int8 bound reads each Linear's input once: per layer
    /// (2 x 512 + 1536) x 4 + 512 x 2 = 11,264 bytes a token.
    #[test]
    fn phi3_adapters_are_peft_s_packed_linears() {
        let m = four_layers_of("phi-3-mini", 1536);
        assert_eq!(
            Role::of_layer(&m),
            [Role::O, Role::Qkv, Role::GateUp, Role::Down]
        );
        let l = LoraConfig::with_rank(16);
        assert_eq!(trainable_params(&m, &l), 557_056);
        assert_eq!(
            &adapter_shapes(&m, &l)[..4],
            [(16, 512), (512, 16), (16, 512), (1536, 16)]
        );
        assert_eq!(int8_outlier_bound_bytes(&m, 2048, 2), 4 * 2048 * 11_264);
    }

    /// A GPT-NeoX (Pythia) layer of neox-lora-r16-all-bf16amp (512 wide, MLP 2048): peft's names, in module
    /// order, and the record's 524,288 trainable parameters: per layer 16 x ((512 + 1536) + (512 + 512) +
    /// (512 + 2048) + (2048 + 512)).
    #[test]
    fn neox_adapters_use_its_own_module_names() {
        let m = four_layers_of("pythia-160m", 2048);
        assert_eq!(
            Role::of_layer(&m),
            [
                Role::QueryKeyValue,
                Role::Dense,
                Role::DenseHTo4h,
                Role::Dense4hToH
            ]
        );
        let l = LoraConfig::with_rank(16);
        assert_eq!(trainable_params(&m, &l), 524_288);
        let qkv = Targets::parse(["query_key_value"]).unwrap();
        assert_eq!(qkv.names(), ["query_key_value"]);
        let only_qkv = LoraConfig {
            targets: qkv,
            ..LoraConfig::with_rank(16)
        };
        // neox-lora-r16-qkv-bf16amp: 131,072.
        assert_eq!(trainable_params(&m, &only_qkv), 131_072);
    }

    /// peft refuses targets that name no module of the model; a Phi-3 layer has no q_proj or v_proj (peft's
    /// default for the Llama-style families), and a Llama layer no qkv_proj.
    #[test]
    fn targets_must_name_a_linear_of_the_family() {
        let e = |family: &str, targets: serde_json::Value| {
            let s = crate::input::setup_from_value(&serde_json::json!({
                "model": {"family": family, "n_layer": 2, "n_head": 4, "n_embd": 256,
                          "intermediate_size": 512, "vocab_size": 1000, "block_size": 64},
                "train": {"precision": "bf16-amp", "base_dtype": "bf16",
                          "lora": {"r": 8, "target_modules": targets}}}))?;
            s.validate()
        };
        let phi3 = e("phi3", serde_json::json!(["q_proj", "v_proj"]))
            .unwrap_err()
            .to_string();
        assert!(
            phi3.starts_with(
                "train.lora.target_modules (q_proj, v_proj) names no Linear of a phi3 layer, whose Linears are \
                 o_proj, qkv_proj, gate_up_proj, down_proj"
            ),
            "{phi3}"
        );
        assert!(e("llama", serde_json::json!(["qkv_proj"])).is_err());
        assert_eq!(
            e("phi3", serde_json::json!(["qkv_proj"])).map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(
            e("phi3", serde_json::json!("all-linear")).map_err(|e| e.to_string()),
            Ok(())
        );
    }

    /// peft 0.21.2's `print_trainable_parameters` for Mixtral-8x7B under the LoRA recipe (r 16, `"all-linear"`,
    /// built on the meta device in the measurement venv): 359,665,664. Per layer (4096 wide, kv 1024, 8 experts of
    /// 14,336): q and o 16 x (4096 + 4096) = 131,072 each, k and v 16 x (4096 + 1024) = 81,920 each; the router's
    /// ParamWrapper 16 x 4096 + 8 x 16 = 65,664; gate_up's A [8 x 32, 4096] and B [28,672, 8 x 32] (rank doubled
    /// for the fused w1 and w3) 1,048,576 + 7,340,032; down's A [8 x 16, 14,336] and B [4096, 8 x 16] 1,835,008 +
    /// 524,288: 11,239,552 a layer, x 32. The recipe drops dropout there (peft's ParamWrapper refuses it).
    #[test]
    fn mixtral_lora_reaches_the_router_and_the_fused_experts() {
        let m = crate::presets::model_preset("mixtral-8x7b").unwrap().model;
        assert_eq!(
            Role::of_layer(&m),
            [
                Role::Q,
                Role::K,
                Role::V,
                Role::O,
                Role::Router,
                Role::GateUp,
                Role::Down
            ]
        );
        let l = Method::adapters_for(&m);
        assert_eq!(l.dropout, 0.0);
        assert_eq!(trainable_params(&m, &l), 359_665_664);
        assert_eq!(
            &adapter_shapes(&m, &l)[8..14],
            [
                (16, 4096),
                (8, 16),
                (256, 4096),
                (28_672, 256),
                (128, 14_336),
                (4096, 128)
            ]
        );
        // OLMoE-1B-7B (2048 wide, 64 experts of 1024): peft's 189,284,352 = 16 x (4 x 65,536 + 33,792 +
        // 8,388,608 + 3,145,728).
        let o = crate::presets::model_preset("olmoe-1b-7b").unwrap().model;
        assert_eq!(trainable_params(&o, &Method::adapters_for(&o)), 189_284_352);
        // The merged expert weights a block keeps under LoRA: (2 + 1) x 8 x 4096 x 14,336 bf16 = 2.62 GiB.
        let s = Method::Lora.apply(&crate::presets::model_preset("mixtral-8x7b").unwrap());
        assert_eq!(merged_expert_bytes(&s), 3 * 8 * 4096 * 14_336 * 2);
    }

    /// Qwen2-MoE's routed experts stay out of peft's reach: `"all-linear"` adapts the attention, the shared
    /// expert's three Linears and `shared_expert_gate` (C -> 1), as qwen2moe-lora-r8-all-bf16amp's 73,744
    /// trainable parameters say: per layer (256 wide, shared expert 512) 4 x 8 x (256 + 256), plus 2 x 8 x
    /// (256 + 512), plus 8 x (512 + 256), plus 8 x (256 + 1): 36,872, two layers. Dropout is allowed there, and the first block's
    /// experts need an adapter upstream: targets without the attention are refused.
    #[test]
    fn qwen2_moe_lora_adapts_the_shared_expert_only() {
        let setup = |targets: serde_json::Value, dropout: f64| {
            crate::input::setup_from_value(&serde_json::json!({
                "model": {"hf": {"model_type": "qwen2_moe", "vocab_size": 8192, "hidden_size": 256,
                    "intermediate_size": 1024, "moe_intermediate_size": 256,
                    "shared_expert_intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
                    "max_position_embeddings": 4096, "tie_word_embeddings": false}},
                "train": {"precision": "bf16-amp", "base_dtype": "bf16",
                          "lora": {"r": 8, "dropout": dropout, "target_modules": targets}}}))
            .unwrap()
        };
        let s = setup("all-linear".into(), 0.05);
        assert_eq!(s.validate().map_err(|e| e.to_string()), Ok(()));
        let l = s.train.lora.as_ref().unwrap();
        assert_eq!(trainable_params(&s.model, l), 73_744);
        assert_eq!(merged_expert_bytes(&s), 0);
        let e = setup(serde_json::json!(["gate_proj", "up_proj"]), 0.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "not modelled: train.lora.target_modules (gate_proj, up_proj) on qwen2_moe"
            ),
            "{e}"
        );
    }

    /// peft's ParamWrapper raises on dropout: a Mixtral config with dropout on the experts is refused naming the
    /// field; on the attention alone it is peft's ordinary LoRA.
    #[test]
    fn mixtral_refuses_dropout_on_the_experts() {
        let e = |targets: serde_json::Value, dropout: f64| {
            let mut s = crate::presets::model_preset("mixtral-8x7b").unwrap();
            s.train.precision = Precision::Bf16Amp;
            s.train.base_dtype = Some(BaseDtype::Bf16);
            s.train.lora = Some(LoraConfig {
                dropout,
                targets: Targets::parse(
                    targets
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap()),
                )
                .unwrap(),
                ..LoraConfig::with_rank(16)
            });
            s.validate().map_err(|e| e.to_string())
        };
        let all = e(serde_json::json!(["all-linear"]), 0.05).unwrap_err();
        assert!(
            all.starts_with("train.lora.dropout (0.05) must be 0 when the adapters reach mixtral's router or fused \
                             experts (gate, gate_up_proj, down_proj, which \"all-linear\" includes)"),
            "{all}"
        );
        assert_eq!(e(serde_json::json!(["q_proj", "v_proj"]), 0.05), Ok(()));
        assert_eq!(e(serde_json::json!(["all-linear"]), 0.0), Ok(()));
        // LoRA on a mixture of experts was measured on one GPU.
        let mut s = crate::presets::model_preset("mixtral-8x7b").unwrap();
        s.train.lora = Some(Method::adapters_for(&s.model));
        s.train.base_dtype = Some(BaseDtype::Bf16);
        s.train.parallel.strategy = crate::parallel::Strategy::Ddp;
        s.train.parallel.gpus = 2;
        assert!(check_parallel(&s).unwrap_err().to_string().starts_with(
            "not modelled: train.lora on mixtral with train.parallel.strategy \"ddp\""
        ));
    }

    /// tests/data/finetune/stub-cuda.json, llama-lora-r16-all-bf16amp: 622,592 trainable parameters (4 layers,
    /// 512 wide, GQA 8/4 (kv 256), MLP 1536, r 16): per layer 16 x (1024 + 768 + 768 + 1024 + 2048 + 2048 + 2048).
    #[test]
    fn adapter_count_is_peft_s() {
        let mut m = crate::presets::model_preset("llama-3.2-1b").unwrap().model;
        (
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.n_kv_head,
            m.intermediate_size,
            m.head_dim,
        ) = (4, 512, 8, 4, 1536, 0);
        let l = LoraConfig::with_rank(16);
        assert_eq!(trainable_params(&m, &l), 622_592);
        assert_eq!(adapter_shapes(&m, &l).len(), 4 * 7 * 2);
    }
}
