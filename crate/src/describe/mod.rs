//! What is trained and how, as data: the setup and its validation (`model`), what a decoder is made of (`arch`),
//! dtypes, optimizers and kernels (`policy`), named models and GPUs (`presets`).

pub mod arch;
pub mod finetune;
pub mod model;
pub mod policy;
pub mod presets;
