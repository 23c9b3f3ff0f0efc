//! The training step replayed: the caching allocator (`allocator`), the allocation timeline (`sim`), one function
//! per op (`tensors`), the eager and compiled executors that walk a description (`eager`, with the mixture-of-experts block in
//! `moe`; `compiled`), the
//! training loop around them (`step`), and what DDP and FSDP2 add to it (`distributed`).

pub mod allocator;
pub mod compiled;
pub mod distributed;
pub mod eager;
pub mod moe;
pub mod reorder;
pub mod sim;
pub mod step;
pub mod tensors;
