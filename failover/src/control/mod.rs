//! The control API: a Unix socket speaking JSON lines (`protocol`), served by threads of its
//! own (`server`), whose requests the supervisor carries out; and a `GET /metrics` HTTP
//! endpoint (`http`) that asks the same queue. `docs/api.md` documents both.

pub mod fuzz;
pub mod http;
pub mod protocol;
pub mod server;

pub use http::MetricsEndpoint;
pub use protocol::{ErrorKind, Reply, Request};
pub use server::{
    bind_owner_only, bind_owner_only_replacing, ControlError, ControlSocket, PendingRequest,
    RequestQueue, Serving,
};
