//! Typha: one watch on the API server, fanned out to many node agents. Today: the wire protocol
//! ([`protocol`]) and the snapshot plus delta log ([`log`]); the mutual-TLS server and client arrive with
//! the Typha issue and feed the agent's datastore the same [`Update`](crate::datastore::Update)s a direct
//! watch does.

pub mod client;
pub mod log;
pub mod protocol;
pub mod server;
pub mod tls;
