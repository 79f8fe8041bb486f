//! caracal-node
