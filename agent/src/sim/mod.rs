pub mod engine;
pub mod load;
