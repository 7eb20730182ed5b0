//! The control channel: the operator's commands (`status`, `top`, `bans`, `ban`, `unban`,
//! `reload`, `release`) talk to the running daemon over a root-only Unix socket.
//!
//! One exchange per connection: the client sends one JSON line and reads one JSON line back.
//!
//! ```text
//! {"command":"bans"}                                        {"ok":true,"bans":[...]}
//! {"command":"ban","address":"192.0.2.0/24","for_seconds":3600} {"ok":true,"address":"192.0.2.0/24"}
//! {"command":"unban","address":"192.0.2.7"}                 {"ok":true,"address":"192.0.2.7"}
//! {"command":"status"}                                      {"ok":true,"status":{...}}
//! {"command":"stats"}                                       {"ok":true,"stats":{...}}
//! {"command":"reload"}                                      {"ok":true,"reload":{...}}
//! {"command":"release","service":"system.slice/web.service"} {"ok":true,"released":"thawed ..."}
//!                                                           {"ok":false,"error":"..."}
//! ```
//!
//! Only root gets in: the socket is mode 0600 in a 0700 directory, and the daemon checks each
//! peer's uid as well, so a loosened file mode does not open it up.

mod client;
mod protocol;
pub mod report;
mod server;
pub mod stats;

#[cfg(test)]
mod tests;

pub use client::{
    ban, ban_list, bans, format_duration, release, reload, reload_text, request, stats, status,
    status_text, unban, unbanned_text,
};
pub use protocol::{Request, Response};
pub use server::{ControlSocket, DaemonView, ReloadRequest, StatsSource};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/sentinel/control.sock";
