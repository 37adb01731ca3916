//! One module per command group; each returns the exit code on success.

pub mod audit;
pub mod catalog;
pub mod config;
pub mod request;
pub mod session;
