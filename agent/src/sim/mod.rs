pub mod engine;
pub mod load;
pub mod server;
