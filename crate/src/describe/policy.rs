//! Precision, optimizer and attention policies: which dtype each kind of tensor has, which kernels run.

use crate::error::Error;

/// How the step handles floating-point precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything fp32.
    Fp32,
    /// fp32 weights, `torch.autocast(dtype=float16)`, GradScaler.
    Fp16Amp,
    /// fp32 weights, `torch.autocast(dtype=bfloat16)`.
    Bf16Amp,
    /// Weights, grads and optimizer state in bf16; no autocast.
    Bf16,
}

impl Precision {
    pub const NAMES: &'static [&'static str] = &["fp32", "fp16-amp", "bf16-amp", "bf16"];

    pub fn parse(s: &str) -> Result<Precision, Error> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16-amp" => Ok(Precision::Fp16Amp),
            "bf16-amp" => Ok(Precision::Bf16Amp),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::UnknownValue {
                field: "train.precision".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Bytes per element of parameters, their grads and optimizer state.
    pub fn param_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            _ => 4,
        }
    }

    /// Bytes per element of matmul outputs (autocast's lower-precision list: mm, addmm, bmm, SDPA).
    pub fn matmul_bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            _ => 2,
        }
    }

    /// Whether autocast is on: matmul inputs and weights are cast to 2 bytes on the fly.
    pub fn autocast(self) -> bool {
        matches!(self, Precision::Fp16Amp | Precision::Bf16Amp)
    }
}

/// The optimizer and its implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    /// `torch.optim.AdamW(foreach=True)`, PyTorch's default on CUDA.
    AdamW,
    /// `torch.optim.AdamW(fused=True)`, what nanoGPT asks for on CUDA.
    AdamWFused,
    /// `torch.optim.SGD` without momentum: no state.
    Sgd,
    /// `torch.optim.SGD(momentum=0.9)`: one momentum buffer per parameter.
    SgdMomentum,
    /// bitsandbytes `AdamW8bit` (blockwise): two uint8 states of the parameter's shape and two fp32 absmax per 256
    /// elements for parameters of at least 4096 elements (`min_8bit_size`), fp32 states below.
    AdamW8bit,
    /// bitsandbytes `PagedAdamW8bit`: `AdamW8bit` with the uint8 states of parameters of at least 1e5 elements in
    /// CUDA managed memory, outside PyTorch's allocator (not counted here: see `step::optimizer_stage`).
    PagedAdamW8bit,
    /// `torch.optim.Adafactor(foreach=True)`: factored second moments (a row and a column vector per matrix).
    Adafactor,
    /// bitsandbytes `Lion` (32-bit): one fp32 state of the parameter's shape.
    Lion,
    /// bitsandbytes `Lion8bit`: one uint8 state and an fp32 absmax per 256 elements (fp32 below 4096 elements).
    Lion8bit,
}

impl Optimizer {
    pub const NAMES: &'static [&'static str] = &[
        "adamw",
        "adamw-fused",
        "sgd",
        "sgd-momentum",
        "adamw8bit",
        "paged-adamw8bit",
        "adafactor",
        "lion",
        "lion8bit",
    ];

    pub fn parse(s: &str) -> Result<Optimizer, Error> {
        match s {
            "adamw" => Ok(Optimizer::AdamW),
            "adamw-fused" => Ok(Optimizer::AdamWFused),
            "sgd" => Ok(Optimizer::Sgd),
            "sgd-momentum" => Ok(Optimizer::SgdMomentum),
            "adamw8bit" => Ok(Optimizer::AdamW8bit),
            // transformers' `optim` name.
            "paged-adamw8bit" | "paged_adamw8bit" | "paged_adamw_8bit" => {
                Ok(Optimizer::PagedAdamW8bit)
            }
            "adafactor" => Ok(Optimizer::Adafactor),
            "lion" => Ok(Optimizer::Lion),
            "lion8bit" => Ok(Optimizer::Lion8bit),
            _ => Err(Error::UnknownValue {
                field: "train.optimizer".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// How attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// `F.scaled_dot_product_attention(is_causal=True)`: flash or memory-efficient kernels, nothing T x T kept.
    Sdpa,
    /// nanoGPT's non-flash path: T x T scores materialised, masked, softmaxed and saved.
    Manual,
    /// Hugging Face's `attn_implementation="flash_attention_2"`: the flash-attn package (2.8) instead of SDPA,
    /// its `FlashAttnFunc` and CUDA extension (`flash_api.cpp`), which save and allocate other tensors than
    /// PyTorch's own flash kernel (`tensors::flash_attn_fwd`, `flash_attn_bwd`).
    FlashAttention2,
}

impl Attention {
    pub const NAMES: &'static [&'static str] = &["sdpa", "manual", "flash_attention_2"];

    pub fn parse(s: &str) -> Result<Attention, Error> {
        match s {
            "sdpa" => Ok(Attention::Sdpa),
            // transformers' name for the same ops on a Hugging Face model.
            "manual" | "eager" => Ok(Attention::Manual),
            "flash_attention_2" => Ok(Attention::FlashAttention2),
            _ => Err(Error::UnknownValue {
                field: "train.attention".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// The SDPA kernel PyTorch picks on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpaBackend {
    /// FlashAttention-2: saves output and logsumexp fp32 [B, H, T].
    Flash,
    /// Memory-efficient (xformers-style): saves output and logsumexp fp32 [B, H, round32(T)].
    Efficient,
}

/// PyTorch 2.15's SDPA choice on CUDA: priority flash, efficient, math, cuDNN
/// (`torch._C._get_sdp_priority_order()`), each taken when its `can_use_*` check passes.
///
/// # Errors
/// `NotModelled` when neither fused kernel applies and SDPA would fall back to the math path.
pub fn sdpa_backend(sm: u32, matmul_bytes: u64, head_dim: u64) -> Result<SdpaBackend, Error> {
    // Flash: fp16/bf16 only, sm_80 or newer, head_dim <= 256 (padded to a multiple of 8 by SDPA).
    if matmul_bytes == 2 && sm >= 80 && head_dim <= 256 && head_dim.is_multiple_of(8) {
        return Ok(SdpaBackend::Flash);
    }
    // Memory-efficient: any float dtype, sm_50 or newer; the last dimension aligned to 16 bytes.
    let align = 16 / matmul_bytes;
    if sm >= 50 && head_dim.is_multiple_of(align) {
        return Ok(SdpaBackend::Efficient);
    }
    // Below sm_50 no head size helps: the message names the compute capability, not the head size.
    if sm < 50 {
        return Err(Error::NotModelled {
            what: format!(
                "compute capability {}.{} has neither of scaled_dot_product_attention's fused kernels (flash: 8.0 \
                 and newer, memory-efficient: 5.0 and newer), so it takes its math fallback; use attention \"manual\"",
                sm / 10,
                sm % 10
            ),
        });
    }
    Err(Error::NotModelled {
        what: format!(
            "head size {head_dim} sends scaled_dot_product_attention to its math fallback; \
             use a head size that is a multiple of 8, or attention \"manual\""
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in Precision::NAMES {
            assert_eq!(Precision::parse(n).map(Precision::name), Ok(*n));
        }
        for n in Optimizer::NAMES {
            assert_eq!(Optimizer::parse(n).map(Optimizer::name), Ok(*n));
        }
        for n in Attention::NAMES {
            assert_eq!(Attention::parse(n).map(Attention::name), Ok(*n));
        }
    }

    #[test]
    fn unknown_precision_lists_the_allowed_values() {
        let e = Precision::parse("fp8").unwrap_err().to_string();
        assert_eq!(
            e,
            "train.precision (\"fp8\") is not one of: fp32, fp16-amp, bf16-amp, bf16"
        );
    }

    #[test]
    fn sdpa_picks_flash_for_half_precision_and_efficient_for_fp32() {
        assert_eq!(sdpa_backend(90, 2, 64), Ok(SdpaBackend::Flash));
        assert_eq!(sdpa_backend(90, 4, 64), Ok(SdpaBackend::Efficient));
        assert_eq!(sdpa_backend(75, 2, 64), Ok(SdpaBackend::Efficient));
        assert!(sdpa_backend(90, 2, 12).is_err());
        // sm_3x: the compute capability is what sends SDPA to its math path, and the message says so (it named
        // the head size, 64, a multiple of 8).
        let e = sdpa_backend(37, 2, 64).unwrap_err().to_string();
        assert!(
            e.starts_with("not modelled: compute capability 3.7 has neither"),
            "{e}"
        );
    }
}
