//! The control socket: a Unix socket speaking the `agentctl` protocol. Each connection is its
//! own task; the peer's credentials (SO_PEERCRED) decide what it may do; requests go to the
//! daemon loop over a channel, so they are applied between cycles, never during one.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{
    decode_body, encode_frame, frame_len, ErrorKind, Hello, ProtoError, Request, Response, Welcome, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::ControlSection;

/// How long a client may take to say hello, and to send a whole frame once it started one.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to answer (it answers between cycles).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once by default; `watch` holds one open, so this is per operator
/// terminal. Past it, a newcomer is told the agent is busy instead of exhausting descriptors.
pub const MAX_CONNECTIONS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot create the control socket {path}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary groups of the uid (when the user is known to the system).
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// May change state.
    Write,
    /// May only read status.
    Read,
    /// Refused outright.
    None,
}

/// The `[control]` section's rules.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub allow_root: bool,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub others_may_read: bool,
}

impl AccessPolicy {
    pub fn from_config(c: &ControlSection) -> AccessPolicy {
        AccessPolicy {
            allow_root: c.allow_root,
            allow_uids: c.allow_uids.clone(),
            allow_gids: c.allow_gids.clone(),
            others_may_read: c.others_may_read,
        }
    }

    pub fn access(&self, p: &Peer) -> Access {
        let allowed = (self.allow_root && p.uid == 0)
            || self.allow_uids.contains(&p.uid)
            || self.allow_gids.contains(&p.gid)
            || p.groups.iter().any(|g| self.allow_gids.contains(g));
        if allowed {
            Access::Write
        } else if self.others_may_read {
            Access::Read
        } else {
            Access::None
        }
    }
}

/// A request on its way to the daemon loop.
#[derive(Debug)]
pub struct ControlCall {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
}

/// The bound socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    max_connections: usize,
}

impl ControlSocket {
    /// Binds `path` with mode 0660. A socket file left by a crashed agent is replaced; one a
    /// live agent still answers on is not, and neither is anything that is not a socket (the
    /// agent runs as root: a mistyped path or a planted symlink must not delete a file).
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        use std::os::unix::fs::FileTypeExt;
        let bind_err = |source| ControlError::Bind { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(ControlError::NotASocket(path.to_owned())),
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_owned()));
                }
                info!(path = %path.display(), "replacing a stale control socket");
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
        Ok(ControlSocket { listener, path: path.to_owned(), max_connections: MAX_CONNECTIONS })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the socket file to group `gid`. With mode 0660 and root ownership only root could
    /// connect at all; the allow-lists and `others_may_read` only matter for peers that can
    /// open the socket, so the operators' group must own it.
    pub fn set_group(&self, gid: u32) -> Result<(), ControlError> {
        std::os::unix::fs::chown(&self.path, None, Some(gid))
            .map_err(|source| ControlError::Bind { path: self.path.clone(), source })
    }

    /// Changes how many connections are served at once (at least 1).
    pub fn with_max_connections(mut self, n: usize) -> ControlSocket {
        self.max_connections = n.max(1);
        self
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(self, policy: AccessPolicy, tx: mpsc::Sender<ControlCall>, mut shutdown: watch::Receiver<bool>) {
        info!(path = %self.path.display(), "control socket listening");
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors, say: wait instead of spinning on accept.
                            warn!(error = %e, "control socket accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        warn!(max = self.max_connections, "control socket busy: connection turned away");
                        tokio::spawn(busy(stream));
                        continue;
                    };
                    let (policy, tx) = (policy.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, policy, tx).await {
                            debug!(error = %e, "control connection ended");
                        }
                        drop(slot);
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The peer's credentials, read with SO_PEERCRED.
fn peer_of(stream: &UnixStream) -> Result<Peer, ProtoError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| ProtoError::Io(e.into()))?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let groups = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .and_then(|u| {
            let name = std::ffi::CString::new(u.name).ok()?;
            nix::unistd::getgrouplist(&name, gid.into()).ok()
        })
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    Ok(Peer { uid, gid, pid: cred.pid(), groups })
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    s: &mut UnixStream,
    wait_first: Option<Duration>,
) -> Result<T, ProtoError> {
    let mut prefix = [0u8; 4];
    let first = s.read_exact(&mut prefix);
    let got = match wait_first {
        Some(t) => tokio::time::timeout(t, first).await.map_err(|_| ProtoError::Closed)?,
        None => first.await,
    };
    got.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtoError::Closed,
        _ => ProtoError::Io(e),
    })?;
    let mut body = vec![0u8; frame_len(prefix)?];
    tokio::time::timeout(FRAME_TIMEOUT, s.read_exact(&mut body))
        .await
        .map_err(|_| ProtoError::Decode("frame body did not arrive in time".into()))??;
    decode_body(&body)
}

async fn write_frame<T: serde::Serialize>(s: &mut UnixStream, v: &T) -> Result<(), ProtoError> {
    s.write_all(&encode_frame(v)?).await?;
    Ok(())
}

/// An error answer: how every refusal and failure reaches the wire (the socket layer's, and the
/// daemon's request handlers').
pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error { kind, message: message.into() }
}

/// Turns a connection away when all slots are taken: reads its hello (briefly, so the client
/// reads the answer rather than a broken pipe) and says why.
async fn busy(mut s: UnixStream) {
    let hello = tokio::time::timeout(Duration::from_secs(1), read_frame::<Hello>(&mut s, None)).await;
    if matches!(hello, Ok(Ok(_))) {
        let msg = "the agent is serving too many control connections; try again shortly";
        let _ = write_frame(&mut s, &Err::<Welcome, _>(error(ErrorKind::Failed, msg))).await;
    }
}

/// One client: hello, then requests until it hangs up. A bad frame gets an error reply and
/// the connection is closed (the stream may be out of step); the agent carries on.
async fn connection(mut s: UnixStream, policy: AccessPolicy, tx: mpsc::Sender<ControlCall>) -> Result<(), ProtoError> {
    let peer = peer_of(&s)?;
    let access = policy.access(&peer);
    // Read the hello before any refusal, so the client reads the answer instead of a broken pipe.
    let hello: Hello = match read_frame(&mut s, Some(FRAME_TIMEOUT)).await {
        Ok(h) => h,
        Err(e) => {
            let _ = write_frame(&mut s, &Err::<Welcome, _>(error(ErrorKind::BadRequest, e.to_string()))).await;
            return Err(e);
        }
    };
    if access == Access::None {
        let msg = format!("uid {} may not use this agent's control socket", peer.uid);
        warn!(uid = peer.uid, pid = peer.pid, "control connection refused");
        let _ = write_frame(&mut s, &Err::<Welcome, _>(error(ErrorKind::Refused, msg))).await;
        return Ok(());
    }
    if hello.version != PROTOCOL_VERSION {
        let msg = format!("protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}", hello.version);
        write_frame(&mut s, &Err::<Welcome, _>(error(ErrorKind::Version, msg))).await?;
        return Ok(());
    }
    let welcome = Welcome { version: PROTOCOL_VERSION, agent_version: env!("CARGO_PKG_VERSION").into() };
    write_frame(&mut s, &Ok::<_, Response>(welcome)).await?;
    loop {
        let request: Request = match read_frame(&mut s, None).await {
            Ok(r) => r,
            Err(ProtoError::Closed) => return Ok(()),
            Err(e) => {
                let _ = write_frame(&mut s, &error(ErrorKind::BadRequest, e.to_string())).await;
                return Err(e);
            }
        };
        let response = if request.changes_state() && access != Access::Write {
            warn!(uid = peer.uid, pid = peer.pid, ?request, "control request refused");
            error(ErrorKind::Refused, format!("uid {} may only read status", peer.uid))
        } else {
            let (reply, answer) = oneshot::channel();
            let call = ControlCall { request, peer: peer.clone(), reply };
            if tx.send(call).await.is_err() {
                error(ErrorKind::Failed, "the agent is shutting down")
            } else {
                match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
                    Ok(Ok(r)) => r,
                    _ => error(ErrorKind::Failed, "the agent did not answer in time"),
                }
            }
        };
        write_frame(&mut s, &response).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: Vec<u32>) -> Peer {
        Peer { uid, gid, pid: 1, groups }
    }

    #[test]
    fn access_follows_the_allow_lists() {
        let p = AccessPolicy { allow_root: true, allow_uids: vec![1000], allow_gids: vec![50], others_may_read: true };
        assert_eq!(p.access(&peer(0, 0, vec![])), Access::Write);
        assert_eq!(p.access(&peer(1000, 1000, vec![])), Access::Write);
        assert_eq!(p.access(&peer(1234, 50, vec![])), Access::Write, "primary group");
        assert_eq!(p.access(&peer(1234, 1234, vec![7, 50])), Access::Write, "supplementary group");
        assert_eq!(p.access(&peer(1234, 1234, vec![7])), Access::Read);
        let strict = AccessPolicy { allow_root: false, others_may_read: false, ..p };
        assert_eq!(strict.access(&peer(0, 0, vec![])), Access::None);
        assert_eq!(strict.access(&peer(1000, 1000, vec![])), Access::Write);
    }

    #[tokio::test]
    async fn binds_0660_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/agent.sock");
        let live = ControlSocket::bind(&path).expect("bind, creating the parent dir");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(ControlSocket::bind(&path), Err(ControlError::InUse(_))), "a live agent answers there");
        drop(live);
        assert!(!path.exists(), "removed on drop");

        // A crashed agent leaves its socket file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let replaced = ControlSocket::bind(&path).expect("stale socket replaced");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "the new socket accepts");
        drop(replaced);
    }

    #[tokio::test]
    async fn socket_can_be_given_to_a_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let s = ControlSocket::bind(&dir.path().join("agent.sock")).expect("bind");
        let own_gid = nix::unistd::getegid().as_raw();
        s.set_group(own_gid).expect("chown to our own group is always allowed");
        assert_eq!(std::fs::metadata(s.path()).expect("meta").gid(), own_gid);
        if nix::unistd::geteuid().is_root() {
            s.set_group(4242).expect("root may give it to any group");
            assert_eq!(std::fs::metadata(s.path()).expect("meta").gid(), 4242);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_are_turned_away_until_one_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let socket = ControlSocket::bind(&path).expect("bind").with_max_connections(2);
        let me = nix::unistd::getuid().as_raw();
        let policy =
            AccessPolicy { allow_root: false, allow_uids: vec![me], allow_gids: vec![], others_may_read: false };
        let (tx, mut rx) = mpsc::channel::<ControlCall>(8);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(socket.serve(policy, tx, stop_rx));
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                assert_eq!(call.peer.uid, me, "SO_PEERCRED names this process's user");
                let _ = call.reply.send(Response::Ok("pong".into()));
            }
        });
        tokio::task::spawn_blocking(move || {
            let pong = |c: &mut proto::Client| matches!(c.call(&Request::Pin(1)), Ok(Response::Ok(m)) if m == "pong");
            let mut a = proto::Client::connect(&path).expect("first");
            let b = proto::Client::connect(&path).expect("second");
            let e = proto::Client::connect(&path).expect_err("third is turned away").to_string();
            assert!(e.contains("too many control connections"), "{e}");
            assert!(pong(&mut a), "the first two are still served");
            drop(b);
            // The slot frees as soon as the server sees the hang-up.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut c = loop {
                match proto::Client::connect(&path) {
                    Ok(c) => break c,
                    Err(e) => assert!(std::time::Instant::now() < deadline, "slot never freed: {e}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(pong(&mut c));
        })
        .await
        .expect("client thread");
        stop_tx.send(true).expect("stop");
        server.await.expect("server ends on shutdown");
        assert!(!dir.path().join("agent.sock").exists(), "socket removed when serving ends");
    }

    #[tokio::test]
    async fn never_deletes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("precious");
        std::fs::write(&file, "keep").expect("write");
        assert!(matches!(ControlSocket::bind(&file), Err(ControlError::NotASocket(_))));
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(matches!(ControlSocket::bind(&link), Err(ControlError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).expect("still there"), "keep");
    }
}
