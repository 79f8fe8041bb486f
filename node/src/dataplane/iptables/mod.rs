//! The iptables policy backend: [`render`] (pure) and [`apply`] (iptables-restore, ipset restore, read-back,
//! removal).

pub mod apply;
pub mod render;
