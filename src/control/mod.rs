//! The control socket's language and gatekeeping (SPEC §3): request parsing and
//! response shapes ([`protocol`]), line framing that wipes what passed through it
//! ([`framing`]), peer-credential authorisation ([`auth`]), roles, grants and rate limits
//! ([`roles`]), bearer tokens ([`tokens`], managed by [`token_cli`]) and the CLI's client
//! ([`client`]).
//!
//! This module never acts on the vault and never owns a socket's lifetime: the
//! supervisor's event loop accepts connections, applies timeouts and limits, and
//! runs the commands these types describe.

pub mod auth;
pub mod client;
pub mod framing;
pub mod metrics_cli;
pub mod protocol;
pub mod roles;
pub mod token_cli;
pub mod tokens;

pub use auth::{authorise, peer_of, Peer};
pub use protocol::{parse_request, ProtocolError, Request, Response, StatusReply, MAX_LINE};
