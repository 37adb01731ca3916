//! aap, the Agent Access Plane: short-lived, operator-approved, audited credentials for AI
//! coding agents. See README.md and shared/DESIGN.md.
//!
//! Modules follow the data: `catalog` (what exists), `config` (where things are), `grant` (who
//! may use what, until when: signed session grants and the check), `state` (the state
//! directory), `audit` (the hash-chained log), `secret` (zeroized secret bytes), `source` (the
//! Infisical client), `devserver` (`aap dev-server`, an in-memory Infisical for tests and
//! demos), `exec` (the `aap-exec` path), `cli`/`cmd` (the commands), and `sys`, the only module
//! allowed `unsafe` and direct libc/nix calls.

pub mod audit;
pub mod broker;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
pub mod devserver;
pub mod duration;
pub mod error;
pub mod exec;
pub mod exec_cli;
pub mod fsutil;
pub mod grant;
pub mod id;
pub mod log;
pub mod proto;
pub mod request;
pub mod secret;
pub mod source;
pub mod state;
pub mod sys;
pub mod timefmt;
pub mod urlenc;
pub mod yaml;
