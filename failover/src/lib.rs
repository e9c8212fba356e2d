//! failover: hot-standby guests on top of `vmm-core`.
//!
//! `config` turns an environment file into validated guest descriptions; `guest` owns one
//! guest's machines and roles and runs its failovers; `checkpoint` is the epoch engine of
//! `resume = "checkpoint"`; `console` holds the console sinks (including output held until
//! its epoch commits); `supervisor` is the event loop that watches every guest; `fault` is
//! the plan of injected failures; `dump` writes crash dumps.
//! It uses only `vmm-core`'s public API.

pub mod checkpoint;
pub mod config;
pub mod console;
pub mod dump;
pub mod fault;
pub mod guest;
pub mod supervisor;
