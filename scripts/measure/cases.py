#!/usr/bin/env python3
"""The reference cases vramfit is checked against: writes scripts/measure/cases.json.

Coverage (issue 2): both families; fp32, fp16-amp, bf16-amp, bf16; adamw, adamw-fused, sgd, sgd-momentum; sdpa
and manual attention; dropout 0 / 0.1+; checkpointing on/off; batch 1-64; sequence 64-4096; vocab 65-152k;
1-48 layers; widths 64-4096; the founding case and GPT-2 124M at block 1024.
"""
import json
import os


def gpt(name, n_layer, n_head, n_embd, block, vocab, batch, precision, optimizer, attention="sdpa", dropout=0.0,
        bias=False, ckpt=False, accum=1, clip=1.0, seq=None, set_to_none=True):
    return {"name": name,
            "model": {"family": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block,
                      "vocab_size": vocab, "bias": bias, "dropout": dropout},
            "train": {"batch_size": batch, "seq_len": seq or block, "precision": precision, "optimizer": optimizer,
                      "attention": attention, "checkpointing": ckpt, "grad_accum_steps": accum, "grad_clip": clip,
                      **({} if set_to_none else {"zero_grad_set_to_none": False})}}


def on_device(case, compute_capability):
    """The case on a GPU of that compute capability (the fake-CUDA stub simulates it: VRAMFIT_STUB_CC)."""
    return {**case, "device": {"compute_capability": compute_capability}}


def compiled(case):
    """The same case under `torch.compile` (nanoGPT train.py's default, `compile = True`)."""
    case = json.loads(json.dumps(case))
    case["name"] += "-compiled"
    case["train"]["compile"] = True
    return case


def llama(name, n_layer, n_head, n_kv, n_embd, inter, vocab, seq, batch, precision, optimizer, tie=False, ckpt=False,
          accum=1, clip=1.0, set_to_none=True):
    return {"name": name,
            "model": {"family": "llama", "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv, "n_embd": n_embd,
                      "intermediate_size": inter, "block_size": seq, "vocab_size": vocab, "tie_embeddings": tie,
                      "dropout": 0.0},
            "train": {"batch_size": batch, "seq_len": seq, "precision": precision, "optimizer": optimizer,
                      "attention": "sdpa", "checkpointing": ckpt, "grad_accum_steps": accum, "grad_clip": clip,
                      **({} if set_to_none else {"zero_grad_set_to_none": False})}}


CASES = [
    # The case that started the project, and its batch and block sweeps.
    gpt("nanogpt-30m-founding", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b1", 6, 6, 384, 512, 50304, 1, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b4", 6, 6, 384, 512, 50304, 4, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b32", 6, 6, 384, 512, 50304, 32, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b64", 6, 6, 384, 512, 50304, 64, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block64", 6, 6, 384, 64, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block256", 6, 6, 384, 256, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block1024", 6, 6, 384, 1024, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-dropout", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw-fused", dropout=0.1),
    gpt("nanogpt-30m-accum4", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw-fused", accum=4),
    gpt("nanogpt-30m-noclip-bf16amp", 6, 6, 384, 512, 50304, 16, "bf16-amp", "adamw-fused", clip=0.0),
    gpt("nanogpt-30m-fp32-adamw", 6, 6, 384, 512, 50304, 8, "fp32", "adamw"),
    gpt("nanogpt-30m-sgdm-fp32", 6, 6, 384, 512, 50304, 8, "fp32", "sgd-momentum"),
    gpt("nanogpt-30m-sgd-bf16amp", 6, 6, 384, 512, 50304, 8, "bf16-amp", "sgd"),
    gpt("nanogpt-30m-ckpt-fp16", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused", ckpt=True),
    # GPT-2 family as nanoGPT trains it.
    gpt("gpt2-124m-block1024", 12, 12, 768, 1024, 50304, 12, "bf16-amp", "adamw-fused"),
    gpt("gpt2-124m-fp32-adamw", 12, 12, 768, 1024, 50304, 4, "fp32", "adamw"),
    gpt("gpt2-124m-bias-fp16", 12, 12, 768, 1024, 50304, 8, "fp16-amp", "adamw-fused", bias=True),
    gpt("gpt2-124m-ckpt-fp32", 12, 12, 768, 1024, 50304, 8, "fp32", "adamw-fused", ckpt=True),
    gpt("gpt2-medium-ckpt", 24, 16, 1024, 1024, 50257, 4, "bf16-amp", "adamw-fused", bias=True, ckpt=True),
    gpt("gpt2-large-bf16", 36, 20, 1280, 1024, 50257, 2, "bf16", "adamw-fused", bias=True),
    gpt("gpt2-xl-ckpt-adamw", 48, 25, 1600, 1024, 50257, 1, "bf16-amp", "adamw", bias=True, ckpt=True),
    # shakespeare-char and small models.
    gpt("shakespeare-char", 6, 6, 384, 256, 65, 64, "bf16-amp", "adamw-fused", dropout=0.2),
    gpt("shakespeare-char-manual-fp16", 6, 6, 384, 256, 65, 64, "fp16-amp", "adamw-fused", attention="manual",
        dropout=0.1),
    gpt("tiny-1layer-fp32-sgd", 1, 4, 64, 64, 65, 1, "fp32", "sgd"),
    gpt("small-b64-fp32", 4, 4, 128, 128, 65, 64, "fp32", "adamw", bias=True),
    gpt("small-bf16-sgdm-dropout", 4, 4, 256, 256, 1024, 16, "bf16", "sgd-momentum", dropout=0.1),
    # Manual attention (T x T scores saved).
    gpt("manual-fp32-adamw", 4, 4, 256, 256, 50304, 8, "fp32", "adamw", attention="manual"),
    gpt("manual-bf16amp", 8, 8, 512, 512, 50304, 4, "bf16-amp", "adamw-fused", attention="manual"),
    gpt("manual-bf16-dropout", 4, 8, 512, 512, 8192, 4, "bf16", "adamw", attention="manual", dropout=0.1),
    gpt("manual-long-fp32", 2, 4, 256, 2048, 50304, 1, "fp32", "sgd", attention="manual"),
    gpt("manual-ckpt-fp16", 4, 4, 256, 512, 50304, 8, "fp16-amp", "adamw-fused", attention="manual", ckpt=True),
    # Long sequences and wide models.
    gpt("long-4096-bf16amp", 4, 4, 256, 4096, 50304, 1, "bf16-amp", "adamw-fused"),
    gpt("wide-4096-bf16amp", 2, 32, 4096, 256, 50304, 2, "bf16-amp", "adamw-fused"),
    gpt("wide-2048-fp32", 2, 16, 2048, 128, 50304, 4, "fp32", "adamw-fused", bias=True),
    # Llama family (Hugging Face LlamaForCausalLM).
    llama("llama-tiny-fp32-mha", 4, 8, 8, 256, 688, 32000, 256, 8, "fp32", "adamw"),
    llama("llama-tiny-bf16amp-gqa", 4, 8, 2, 256, 688, 32000, 256, 8, "bf16-amp", "adamw-fused"),
    llama("llama-64wide-fp16amp", 2, 4, 2, 64, 176, 1000, 64, 4, "fp16-amp", "sgd"),
    llama("llama-small-bf16-fused", 8, 8, 8, 512, 1376, 32000, 512, 4, "bf16", "adamw-fused"),
    llama("llama-small-fp16amp-sgdm", 4, 8, 8, 512, 1376, 32000, 256, 8, "fp16-amp", "sgd-momentum"),
    llama("llama-small-bf16-sgd", 4, 8, 4, 512, 1376, 32000, 256, 8, "bf16", "sgd"),
    llama("llama-adamw-foreach-b16", 4, 8, 4, 512, 1376, 32000, 128, 16, "bf16-amp", "adamw"),
    llama("llama-accum2", 4, 8, 4, 512, 1376, 32000, 256, 8, "bf16-amp", "adamw-fused", accum=2),
    llama("llama-ckpt-1024", 8, 16, 4, 1024, 2816, 32000, 1024, 4, "bf16-amp", "adamw-fused", ckpt=True),
    llama("llama-seq4096", 4, 8, 2, 512, 1376, 32000, 4096, 1, "bf16-amp", "adamw-fused"),
    llama("tinyllama-1.1b", 22, 32, 4, 2048, 5632, 32000, 2048, 1, "bf16-amp", "adamw-fused"),
    llama("llama-3.2-1b-tied", 16, 32, 8, 2048, 8192, 128256, 1024, 1, "bf16-amp", "adamw-fused", tie=True),
    llama("qwen2.5-0.5b-bf16", 24, 14, 2, 896, 4864, 151936, 512, 2, "bf16", "adamw-fused", tie=True),
    # zero_grad(set_to_none=False): gradients stay allocated between steps and are zeroed in place.
    gpt("nanogpt-30m-keep-grads", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused", set_to_none=False),
    gpt("gpt2-124m-keep-grads-fp32", 12, 12, 768, 1024, 50304, 4, "fp32", "adamw", set_to_none=False),
    gpt("small-keep-grads-accum2", 4, 4, 256, 256, 65, 32, "bf16-amp", "sgd-momentum", accum=2, set_to_none=False),
    llama("llama-keep-grads-bf16amp", 4, 8, 4, 512, 1376, 32000, 256, 8, "bf16-amp", "adamw-fused", tie=True,
          set_to_none=False),
    llama("mistral-7b-bf16-ckpt", 32, 32, 8, 4096, 14336, 32000, 512, 1, "bf16", "adamw-fused", ckpt=True),
]

# Compiled (torch.compile, Inductor) nanoGPT cases: measured into tests/data/compiled/ (issue 6).
COMPILED = [compiled(c) for c in [
    gpt("nanogpt-30m-founding", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b4", 6, 6, 384, 512, 50304, 4, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-b32", 6, 6, 384, 512, 50304, 32, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block256", 6, 6, 384, 256, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block1024", 6, 6, 384, 1024, 50304, 8, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-bf16amp", 6, 6, 384, 512, 50304, 16, "bf16-amp", "adamw-fused"),
    gpt("nanogpt-30m-fp32-adamw", 6, 6, 384, 512, 50304, 8, "fp32", "adamw"),
    gpt("nanogpt-30m-dropout", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw-fused", dropout=0.1),
    gpt("nanogpt-30m-manual", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw-fused", attention="manual"),
    gpt("nanogpt-30m-sgd-bf16", 6, 6, 384, 512, 50304, 8, "bf16", "sgd"),
    gpt("shakespeare-char", 6, 6, 384, 256, 65, 64, "bf16-amp", "adamw-fused", dropout=0.2),
    gpt("gpt2-124m-block1024", 12, 12, 768, 1024, 50304, 8, "bf16-amp", "adamw-fused"),
    gpt("gpt2-124m-bias-fp16", 12, 12, 768, 1024, 50304, 4, "fp16-amp", "adamw-fused", bias=True),
    gpt("small-fp32-sgdm", 4, 4, 256, 256, 8192, 16, "fp32", "sgd-momentum"),
    gpt("wide-2048-bf16amp", 2, 16, 2048, 256, 50304, 4, "bf16-amp", "adamw-fused"),
    gpt("nanogpt-30m-accum2", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw-fused", accum=2),
    # Held out: added after the compiled model was written, to check it on shapes and knobs it was not read from.
    gpt("gpt2-medium-block1024", 24, 16, 1024, 1024, 50304, 2, "bf16-amp", "adamw-fused"),
    gpt("manual-dropout-bias", 4, 4, 256, 256, 50304, 8, "fp16-amp", "adamw-fused", attention="manual", dropout=0.1,
        bias=True),
    gpt("fp32-dropout-bias", 6, 8, 512, 512, 32000, 4, "fp32", "adamw", dropout=0.1, bias=True),
    gpt("bf16-dropout", 6, 6, 384, 512, 50304, 8, "bf16", "adamw-fused", dropout=0.1),
    gpt("vocab-50257-block384", 4, 4, 256, 384, 50257, 12, "fp16-amp", "adamw-fused"),
    gpt("one-layer-sgdm", 1, 8, 512, 1024, 50304, 4, "bf16-amp", "sgd-momentum"),
    gpt("fp32-sgd-accum4-noclip", 4, 4, 256, 256, 8192, 8, "fp32", "sgd", accum=4, clip=0.0),
    gpt("foreach-keep-grads", 6, 6, 384, 512, 50304, 8, "fp16-amp", "adamw", set_to_none=False),
    gpt("seq256-of-block1024", 6, 6, 384, 1024, 50304, 16, "bf16-amp", "adamw-fused", seq=256),
    gpt("block2048", 4, 4, 256, 2048, 50304, 4, "bf16-amp", "adamw-fused"),
    gpt("gpt2-8layer-bias-fp16", 8, 12, 768, 512, 50304, 6, "fp16-amp", "adamw-fused", bias=True),
    # Gradients larger than activations, with accumulation: the peak is at the end of a later micro-step's
    # backward, where the compiled graph's gradients all exist before AccumulateGrad adds them. Found by the
    # property test compile_never_increases_the_peak_when_grads_start_empty; the fp32 one corrected the tied embedding's gradient sum.
    gpt("grads-dominate-accum2", 2, 4, 512, 64, 8192, 1, "fp32", "adamw", accum=2, clip=0.0, seq=16),
    gpt("grads-dominate-accum2-bf16", 2, 4, 512, 64, 8192, 1, "bf16", "adamw-fused", accum=2, seq=16),
    gpt("grads-dominate-accum3-fp16", 2, 4, 512, 64, 8192, 2, "fp16-amp", "adamw-fused", accum=3, seq=32),
    # The manual attention path without autocast (the same property test found the first).
    gpt("manual-bf16-long", 1, 2, 64, 256, 16, 4, "bf16", "adamw", attention="manual", clip=0.0),
    gpt("manual-fp32-dropout", 4, 4, 256, 256, 50304, 8, "fp32", "adamw-fused", attention="manual", dropout=0.1),
    # Weight gradients larger than activations under autocast: Inductor converts the fp16 weight gradients to fp32
    # at the end of the graph here (one by one as they are made in the larger cases above); the model converts
    # each as it is made, so it is high by about 1% here (also found by the property test).
    gpt("tiny-vocab-grads-amp", 1, 4, 256, 64, 16, 4, "fp16-amp", "adamw-fused", clip=0.0),
    # Held out, measured after all of the above: train.py's own defaults (GPT-2 124M, batch 12, block 1024, bf16
    # autocast, fused AdamW, accumulation 40 simulated as its steady state) and GPT-2 large at batch 1.
    gpt("train-py-defaults", 12, 12, 768, 1024, 50304, 12, "bf16-amp", "adamw-fused", accum=40),
    gpt("gpt2-large-b1", 36, 20, 1280, 1024, 50304, 1, "bf16-amp", "adamw-fused"),
    # Hugging Face LlamaForCausalLM under torch.compile. The first 2 were read (with traces of small variants)
    # while writing the model; the rest are held out.
    llama("llama-small-gqa-bf16amp", 4, 8, 2, 512, 1408, 32000, 256, 8, "bf16-amp", "adamw-fused"),
    llama("llama-fp32-small", 4, 4, 4, 256, 688, 8192, 256, 8, "fp32", "adamw"),
    llama("llama-8x1024-bf16", 8, 16, 4, 1024, 2816, 32000, 512, 4, "bf16", "adamw-fused"),
    llama("llama-tied-fp16amp-foreach", 6, 8, 8, 512, 1376, 32000, 512, 4, "fp16-amp", "adamw", tie=True),
    llama("qwen-like-tied-152k", 4, 14, 2, 896, 4864, 151936, 256, 2, "bf16-amp", "adamw-fused", tie=True),
    llama("llama-accum2-bf16amp", 4, 8, 2, 512, 1408, 32000, 256, 4, "bf16-amp", "adamw-fused", accum=2),
    llama("llama-3.2-1b-like-b1", 16, 32, 8, 2048, 8192, 128256, 1024, 1, "bf16-amp", "adamw-fused", tie=True),
    llama("llama-keep-grads-sgdm", 4, 8, 2, 512, 1408, 32000, 256, 8, "bf16-amp", "sgd-momentum", set_to_none=False),
    # Measured after llama-8x1024-bf16 corrected the model (pure bf16: HF's loss gradient is fp32): held out again.
    llama("tinyllama-like-b2", 22, 32, 4, 2048, 5632, 32000, 512, 2, "bf16-amp", "adamw-fused"),
    llama("llama-bf16-tied-accum3", 6, 12, 4, 768, 2048, 50000, 384, 3, "bf16", "adamw-fused", tie=True, accum=3),
    # Issue 11, measured once the harness ran Inductor's defaults and saw the whole step. The seed run as its
    # owner ran it (accumulation 4, an RTX 4070: sm_89, whose cuBLAS workspace is smaller), then more of each knob.
    on_device(gpt("nanogpt-30m-founding-accum4-sm89", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused", accum=4),
              8.9),
    gpt("long-4096-bf16amp", 4, 4, 256, 4096, 50304, 1, "bf16-amp", "adamw-fused"),
    gpt("narrow-128-fp32-bias", 4, 4, 128, 128, 65, 64, "fp32", "adamw", bias=True),
    gpt("shakespeare-char-manual-fp16", 6, 6, 384, 256, 65, 64, "fp16-amp", "adamw-fused", attention="manual",
        dropout=0.1),
    gpt("nanogpt-30m-b1", 6, 6, 384, 512, 50304, 1, "fp16-amp", "adamw-fused"),
    gpt("nanogpt-30m-block64", 6, 6, 384, 64, 50304, 16, "fp16-amp", "adamw-fused"),
    gpt("gpt2-124m-fp32-adamw", 12, 12, 768, 1024, 50304, 4, "fp32", "adamw"),
    gpt("small-bf16-sgdm-dropout", 4, 4, 256, 256, 1024, 16, "bf16", "sgd-momentum", dropout=0.1),
    gpt("wide-2048-fp32-bias", 2, 16, 2048, 128, 50304, 4, "fp32", "adamw-fused", bias=True),
    gpt("manual-bf16-dropout-8192", 4, 8, 512, 512, 8192, 4, "bf16", "adamw", attention="manual", dropout=0.1),
    gpt("vocab-50257-fp32-accum2", 4, 4, 256, 256, 50257, 8, "fp32", "adamw-fused", accum=2),
    gpt("nanogpt-30m-noclip-bf16amp", 6, 6, 384, 512, 50304, 16, "bf16-amp", "adamw-fused", clip=0.0),
    gpt("dropout-accum3-bf16amp", 4, 4, 256, 256, 50304, 8, "bf16-amp", "adamw-fused", dropout=0.1, accum=3),
    llama("llama-tiny-fp32-mha", 4, 8, 8, 256, 688, 32000, 256, 8, "fp32", "adamw"),
    llama("llama-64wide-fp16amp", 2, 4, 2, 64, 176, 1000, 64, 4, "fp16-amp", "sgd"),
    llama("llama-small-bf16-sgd", 4, 8, 4, 512, 1376, 32000, 256, 8, "bf16", "sgd"),
    llama("llama-seq4096-b1", 4, 8, 2, 512, 1376, 32000, 4096, 1, "bf16-amp", "adamw-fused"),
    llama("llama-adamw-foreach-b16", 4, 8, 4, 512, 1376, 32000, 128, 16, "bf16-amp", "adamw"),
    llama("llama-fp16amp-sgdm-accum2", 4, 8, 8, 512, 1376, 32000, 256, 8, "fp16-amp", "sgd-momentum", accum=2),
    llama("qwen-like-bf16-152k", 4, 14, 2, 896, 4864, 151936, 512, 2, "bf16", "adamw-fused", tie=True),
    # Issue 11's last item: torch.compile with activation checkpointing (nanoGPT's blocks each in
    # torch.utils.checkpoint(use_reentrant=False), HF's gradient_checkpointing_enable(use_reentrant=False)). The model
    # was written from traces of tiny variants (2 layers, vocab 1000) and of shakespeare-char-ckpt (its recomputed
    # dropouts); the rest were held out.
    gpt("nanogpt-30m-ckpt-fp16amp", 6, 6, 384, 512, 50304, 16, "fp16-amp", "adamw-fused", ckpt=True),
    gpt("gpt-8x512-ckpt-bf16-accum2", 8, 8, 512, 512, 50304, 8, "bf16", "adamw-fused", ckpt=True, accum=2),
    gpt("gpt2-124m-ckpt-bf16amp-dropout", 12, 12, 768, 1024, 50304, 4, "bf16-amp", "adamw-fused", ckpt=True,
        dropout=0.1),
    llama("llama-small-ckpt-bf16amp", 4, 8, 2, 512, 1408, 32000, 256, 8, "bf16-amp", "adamw-fused", ckpt=True),
    llama("llama-ckpt-bf16-tied-accum2", 6, 8, 4, 768, 2048, 32000, 512, 4, "bf16", "adamw-fused", tie=True,
          ckpt=True, accum=2),
    llama("llama-ckpt-fp16amp-accum2", 4, 8, 8, 512, 1376, 32000, 256, 8, "fp16-amp", "adamw-fused", ckpt=True,
          accum=2),
    # Small vocabularies, where the peak is a block's recompute and backward rather than the loss.
    gpt("shakespeare-char-ckpt", 6, 6, 384, 256, 65, 64, "fp16-amp", "adamw-fused", dropout=0.2, ckpt=True),
    llama("llama-ckpt-seq2048-vocab8192", 4, 8, 2, 512, 1408, 8192, 2048, 2, "bf16-amp", "adamw-fused", ckpt=True),
]]

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, cases in (("cases.json", CASES), ("cases-compiled.json", COMPILED)):
        with open(os.path.join(here, name), "w") as f:
            json.dump(cases, f, indent=1)
        print(f"{len(cases)} cases -> {name}")
