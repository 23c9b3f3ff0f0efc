//! What people paste, read into a setup: the setup JSON, nanoGPT config files, Hugging Face config.json, the URL.

pub mod input;
