//! The exec path: argv -> catalog -> session grant -> authorize -> fetch -> inject -> audit start
//! -> spawn child (signals forwarded) -> wait -> teardown -> audit end -> exit with the child's
//! status. See DESIGN.md, "The exec path".

#![forbid(unsafe_code)]

pub mod agent_socket;
pub mod breakglass;
pub mod brokerrun;
pub mod child;
pub mod command;
pub mod gitcred;
pub mod hints;
pub mod inject;
pub mod run;
pub mod wrapped;
