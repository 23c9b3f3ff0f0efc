# GPT-2 (124M) on OpenWebText, 8 GPUs' worth of tokens per step on one node
wandb_log = True
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
