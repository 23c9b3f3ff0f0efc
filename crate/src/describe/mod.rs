//! What is trained and how, as data: the setup and its validation (`model`), what a decoder is made of (`arch`),
//! dtypes, optimizers and kernels (`policy`), more than one GPU (`parallel`), named models and GPUs (`presets`).

pub mod arch;
pub mod finetune;
pub mod model;
pub mod parallel;
pub mod policy;
pub mod presets;
