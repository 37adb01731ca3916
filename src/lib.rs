//! aap, the Agent Access Plane: short-lived, operator-approved, audited credentials for AI
//! coding agents. See README.md and shared/DESIGN.md.
//!
//! Modules follow the data: `catalog` (what exists), `config` (where things are), `cli`/`cmd`
//! (the commands), `secret` (zeroized secret bytes), `source` (the Infisical client),
//! `devserver` (`aap dev-server`, an in-memory Infisical for tests and demos), and `sys`, the
//! only module allowed `unsafe` and direct libc/nix calls.

pub mod catalog;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod devserver;
pub mod duration;
pub mod error;
pub mod exec_cli;
pub mod fsutil;
pub mod log;
pub mod secret;
pub mod source;
pub mod sys;
pub mod yaml;
