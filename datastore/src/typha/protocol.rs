//! Typha's wire protocol: length-prefixed JSON frames. The client says hello (protocol version, node name);
//! the server answers with the snapshot, then `InSync`, then deltas, with ping/pong liveness. Each update is
//! encoded once into a shared frame ([`Frame`]) that every client's connection writes as is.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Update;

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSIONS: [u32; 1] = [1];
/// Largest frame accepted (a snapshot is many frames, so one frame is one object).
pub const MAX_FRAME: usize = 8 << 20;

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMsg {
    /// The first message: who is asking, in which protocol.
    Hello {
        /// Protocol version.
        protocol_version: u32,
        /// The node the client serves.
        node_name: String,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
}

/// What the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerMsg {
    /// The hello was accepted.
    HelloAck {
        /// The protocol version in use.
        protocol_version: u32,
    },
    /// The hello was refused (and the connection closes).
    Error {
        /// What was wrong and what to change.
        message: String,
    },
    /// One datastore update (snapshot or delta), with its position in the server's log.
    Update {
        /// Position in the log.
        seq: u64,
        /// The update.
        update: Update,
    },
    /// The snapshot is complete; deltas follow.
    InSync {
        /// The log position the snapshot corresponds to.
        seq: u64,
    },
    /// Liveness check.
    Ping {
        /// Sequence number to echo.
        seq: u64,
    },
}

/// An encoded frame: a 4-byte big-endian length and the JSON body, shared by every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(pub Arc<[u8]>);

/// Errors reading frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer sent a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a message this build knows.
    #[error("undecodable frame: {0}")]
    Decode(#[from] serde_json::Error),
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl Frame {
    /// Encodes `msg` once.
    pub fn encode<T: Serialize>(msg: &T) -> Frame {
        let body = serde_json::to_vec(msg).unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend(u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend(body);
        Frame(out.into())
    }
}

/// Reads one message from `r`.
pub async fn read<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<T, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Writes a frame to `w`.
pub async fn write(w: &mut (impl tokio::io::AsyncWrite + Unpin), frame: &Frame) -> Result<(), FrameError> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&frame.0).await?;
    Ok(())
}

/// The server's answer to a hello: the version to use, or the error to send.
pub fn negotiate(hello: &ClientMsg) -> Result<u32, String> {
    match hello {
        ClientMsg::Hello {
            protocol_version,
            node_name,
        } if PROTOCOL_VERSIONS.contains(protocol_version) => {
            if node_name.is_empty() {
                Err("hello without a node name: set the agent's node name".into())
            } else {
                Ok(*protocol_version)
            }
        }
        ClientMsg::Hello { protocol_version, .. } => Err(format!(
            "protocol version {protocol_version} is not supported: this Typha speaks {:?}; upgrade Typha before the node agents",
            PROTOCOL_VERSIONS
        )),
        ClientMsg::Pong { .. } => Err("the first message must be a hello".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn frames_round_trip_over_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msgs = vec![
            ServerMsg::HelloAck { protocol_version: 1 },
            ServerMsg::Update {
                seq: 7,
                update: Update::Upsert {
                    kind: "v1/Pod".into(),
                    key: "x/a".into(),
                    object: json!({"metadata": {"name": "a"}}),
                },
            },
            ServerMsg::InSync { seq: 7 },
            ServerMsg::Ping { seq: 1 },
        ];
        for m in &msgs {
            write(&mut a, &Frame::encode(m)).await.unwrap();
        }
        for m in &msgs {
            let got: ServerMsg = read(&mut b).await.unwrap();
            assert_eq!(&got, m);
        }
    }

    #[tokio::test]
    async fn oversized_and_garbled_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &u32::MAX.to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read::<ServerMsg>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        write(&mut a, &Frame(Arc::from(&b"\x00\x00\x00\x02{]"[..])))
            .await
            .unwrap();
        assert!(matches!(
            read::<ServerMsg>(&mut b).await,
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn a_future_protocol_version_gets_a_clear_error() {
        assert_eq!(
            negotiate(&ClientMsg::Hello {
                protocol_version: 1,
                node_name: "n1".into()
            }),
            Ok(1)
        );
        let err = negotiate(&ClientMsg::Hello {
            protocol_version: 2,
            node_name: "n1".into(),
        })
        .unwrap_err();
        assert!(
            err.contains("protocol version 2 is not supported") && err.contains("[1]"),
            "{err}"
        );
        assert!(negotiate(&ClientMsg::Pong { seq: 1 }).is_err());
    }
}
