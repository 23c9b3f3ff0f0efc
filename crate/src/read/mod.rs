//! What people paste, read into a setup: the setup JSON, nanoGPT config files, Hugging Face config.json, the URL; PyTorch memory snapshots
//! (`snapshot`, over a plain-data `pickle` reader and writer).

pub mod input;
pub mod pickle;
pub mod snapshot;
