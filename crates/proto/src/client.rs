//! A small blocking client of the control socket (what `agentctl` uses).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{encode_frame, read_frame, ProtoError};
use crate::{ErrorKind, Hello, Request, Response, Welcome, PROTOCOL_VERSION};

/// Why the client could not talk to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}")]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("agent at {path}")]
    Protocol { path: PathBuf, source: ProtoError },
    #[error("agent at {path}: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("agent at {path} speaks protocol {theirs}, agentctl speaks {ours}: {message}")]
    Version { path: PathBuf, ours: u32, theirs: u32, message: String },
}

/// A connection to the agent's control socket.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    pub agent_version: String,
}

impl Client {
    /// Connects and says hello.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Unreachable { path: path.to_owned(), source })?;
        let timeout = Some(Duration::from_secs(30));
        let _ = stream.set_read_timeout(timeout);
        let _ = stream.set_write_timeout(timeout);
        let mut c = Client { stream, path: path.to_owned(), agent_version: String::new() };
        let hello = Hello { version: PROTOCOL_VERSION, client: format!("agentctl {}", env!("CARGO_PKG_VERSION")) };
        c.send(&hello)?;
        match c.receive::<Result<Welcome, Response>>()? {
            Ok(w) => c.agent_version = w.agent_version,
            Err(Response::Error { kind: ErrorKind::Version, message }) => {
                return Err(ClientError::Version {
                    path: path.to_owned(),
                    ours: PROTOCOL_VERSION,
                    theirs: parse_theirs(&message),
                    message,
                })
            }
            // Refused, or turned away (busy): the agent's message says which.
            Err(Response::Error { message, .. }) => {
                return Err(ClientError::Refused { path: path.to_owned(), message })
            }
            Err(other) => {
                return Err(ClientError::Protocol {
                    path: path.to_owned(),
                    source: ProtoError::Decode(format!("unexpected hello answer {other:?}")),
                })
            }
        }
        Ok(c)
    }

    fn send<T: Serialize>(&mut self, v: &T) -> Result<(), ClientError> {
        let frame = encode_frame(v).map_err(|source| ClientError::Protocol { path: self.path.clone(), source })?;
        self.stream.write_all(&frame).map_err(|e| ClientError::Protocol { path: self.path.clone(), source: e.into() })
    }

    fn receive<T: DeserializeOwned>(&mut self) -> Result<T, ClientError> {
        read_frame(&mut self.stream).map_err(|source| ClientError::Protocol { path: self.path.clone(), source })
    }

    /// One request, one response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.receive()
    }
}

/// The agent's version from its refusal ("... this agent speaks N"): the last number in it
/// (the first one is ours, echoed back).
fn parse_theirs(message: &str) -> u32 {
    message.rsplit(|c: char| !c.is_ascii_digit()).find_map(|t| t.parse().ok()).unwrap_or(0)
}
