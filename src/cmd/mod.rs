//! One module per command group; each returns the exit code on success.

pub mod audit;
pub mod catalog;
pub mod complete;
pub mod config;
pub mod demo;
pub mod devserver;
pub mod doctor;
pub mod gitcredential;
pub mod import;
pub mod infisical;
pub mod manual;
pub mod request;
pub mod session;
pub mod sessionlog;
pub mod watch;
pub mod wrappers;
