//! failover: the environment file and the supervision of guests on top of `vmm-core`.
//!
//! `config` turns an environment file into validated guest descriptions; `supervisor` runs
//! the guests and watches their vCPU events. It uses only `vmm-core`'s public API.

pub mod config;
pub mod supervisor;
