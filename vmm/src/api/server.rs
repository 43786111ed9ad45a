//! The control API server: a Unix stream socket, one reader and one writer
//! thread per connection, replies and events queued per connection.
//!
//! The server knows no commands: it parses a request and hands the
//! [`Command`] with a [`Responder`] to a [`Dispatch`]. The VMM's dispatcher
//! forwards both to the VMM thread over a channel and an eventfd; tests use
//! a fake. Nothing a client sends can panic the server or block the VMM
//! thread: requests are capped at [`MAX_REQUEST_BYTES`], connections at
//! [`MAX_CONNECTIONS`], and outgoing lines go into a bounded per-connection
//! queue whose overflow drops that connection (a client that does not read).
//!
//! Replies leave in request order even when a later request is answered
//! first (a `busy` or a parse error while an earlier command still runs on
//! the VMM thread): each request gets a sequence number and its reply waits
//! for those before it. A full server never locks out `vm.shutdown`: a new
//! client takes the slot of one that sent nothing for the idle timeout
//! ([`IDLE_TIMEOUT`]), and when no client is idle, one extra connection
//! beyond [`MAX_CONNECTIONS`] is kept for `vm.shutdown` alone.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::protocol::{self, parse_request, ApiError, Command, ErrorCode, MAX_REQUEST_BYTES};

/// Most clients connected at once; more are told `busy` and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// Lines queued for one client before it counts as not reading.
const OUTBOX_LINES: usize = 256;
/// A write to a client that takes longer than this drops the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that sent no request for this long, with no reply owed, gives
/// up its connection when a new client finds the server full.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection limits (tests shorten the idle timeout).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("control socket {path} is in use by a running process")]
    InUse { path: PathBuf },
    #[error("cannot create control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the control API thread")]
    Thread(#[source] io::Error),
}

/// Where parsed commands go.
pub trait Dispatch: Send + Sync {
    /// Handles `command` now or later; exactly one reply goes out through
    /// `responder` (dropping it replies with an error).
    fn dispatch(&self, command: Command, responder: Responder);
}

enum Outgoing {
    Line(String),
    /// Write what is queued, then close.
    Close,
}

/// The sending side of one connection.
struct Outbox {
    tx: SyncSender<Outgoing>,
    stream: UnixStream,
    order: Mutex<ReplyOrder>,
}

/// Replies held back until every earlier request of the connection has its
/// reply, so that they leave in request order.
#[derive(Default)]
struct ReplyOrder {
    /// Sequence number of the next request read.
    next_request: u64,
    /// Sequence number of the next reply to send.
    next_reply: u64,
    /// Replies that came early: line, and whether to close after it.
    early: BTreeMap<u64, (String, bool)>,
    /// When the last request was read.
    last_request: Option<std::time::Instant>,
}

impl Outbox {
    /// Queues a line; a full queue means the client stopped reading, so the
    /// connection is shut down rather than anyone waiting for it.
    fn push(&self, line: String) {
        match self.tx.try_send(Outgoing::Line(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                log::warn!("api: client does not read its replies; closing it");
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn close(&self) {
        if self.tx.try_send(Outgoing::Close).is_err() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Numbers the next request.
    fn next_request(&self) -> u64 {
        let mut o = lock(&self.order);
        o.last_request = Some(std::time::Instant::now());
        o.next_request += 1;
        o.next_request - 1
    }

    /// Sends the reply to request `seq` once those before it are out.
    fn reply(&self, seq: u64, line: String, then_close: bool) {
        let mut o = lock(&self.order);
        o.early.insert(seq, (line, then_close));
        loop {
            let next = o.next_reply;
            let Some((line, close)) = o.early.remove(&next) else {
                break;
            };
            o.next_reply += 1;
            self.push(line);
            if close {
                self.close();
            }
        }
        if o.early.len() > OUTBOX_LINES {
            log::warn!("api: client floods requests behind a slow one; closing it");
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// How long the client has been idle: no request for that long and no
    /// reply owed (`None`: busy).
    fn idle_for(&self, now: std::time::Instant, opened: std::time::Instant) -> Option<Duration> {
        let o = lock(&self.order);
        (o.next_reply == o.next_request)
            .then(|| now.saturating_duration_since(o.last_request.unwrap_or(opened)))
    }
}

/// Answers one request. Dropping it unanswered replies `internal`.
pub struct Responder {
    id: Value,
    seq: u64,
    outbox: Option<Arc<Outbox>>,
}

impl Responder {
    pub fn reply(mut self, result: Result<Value, ApiError>) {
        if let Some(out) = self.outbox.take() {
            out.reply(self.seq, protocol::reply(&self.id, &result), false);
        }
    }

    pub fn error(self, code: ErrorCode, message: impl Into<String>) {
        self.reply(Err(ApiError::new(code, message)));
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(out) = self.outbox.take() {
            let e = ApiError::new(
                ErrorCode::Internal,
                "the request was dropped (VMM stopping)",
            );
            out.reply(self.seq, protocol::reply(&self.id, &Err(e)), false);
        }
    }
}

/// One open connection.
struct Conn {
    outbox: Arc<Outbox>,
    writer: Option<JoinHandle<()>>,
    opened: std::time::Instant,
    /// The spare connection kept for `vm.shutdown`.
    shutdown_only: bool,
}

#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Conn>,
}

/// Sends events to every connected client. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    conns: Arc<Mutex<Connections>>,
}

impl EventBus {
    /// Sends `{"event":name,"ts_us":..,"data":data}` to every client.
    pub fn emit(&self, name: &str, data: Value) {
        let line = protocol::event_line(name, protocol::now_us(), &data);
        for c in lock(&self.conns).open.values() {
            c.outbox.push(line.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running API server. [`ApiServer::shutdown`] (or drop) stops it.
pub struct ApiServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<Connections>>,
    accept: Option<JoinHandle<()>>,
    requests: Arc<AtomicU64>,
}

/// Binds `path`, replacing a stale socket left by a dead process.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse {
                    path: path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Only the owner may drive the VM.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

impl ApiServer {
    /// Listens on `path` and hands commands to `dispatch`.
    pub fn start(path: &Path, dispatch: Arc<dyn Dispatch>) -> Result<Self, ServerError> {
        Self::start_with(path, dispatch, Limits::default())
    }

    /// [`ApiServer::start`] with other limits.
    pub fn start_with(
        path: &Path,
        dispatch: Arc<dyn Dispatch>,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let listener = bind(path)?;
        // Also gone when the VMM cannot stop in order (crate::signals).
        crate::signals::remove_on_forced_exit(path);
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Connections::default()));
        let requests = Arc::new(AtomicU64::new(0));
        let ctx = AcceptCtx {
            stopping: stopping.clone(),
            conns: conns.clone(),
            dispatch,
            requests: requests.clone(),
            limits,
        };
        let accept = thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Its reader and writer threads inherit this filter.
                crate::seccomp::apply(crate::seccomp::ThreadKind::Api);
                ctx.run(listener)
            })
            .map_err(ServerError::Thread)?;
        log::info!("control API on {}", path.display());
        Ok(Self {
            path: path.to_owned(),
            stopping,
            conns,
            accept: Some(accept),
            requests,
        })
    }

    pub fn events(&self) -> EventBus {
        EventBus {
            conns: self.conns.clone(),
        }
    }

    /// Requests parsed so far (for tests and counters).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets every client's queued lines (replies already
    /// given, such as the one to `vm.shutdown`) go out, closes the
    /// connections and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept() call; the thread sees `stopping` and ends.
        let _ = UnixStream::connect(&self.path);
        let _ = accept.join();
        let writers: Vec<_> = {
            let mut c = lock(&self.conns);
            let open = std::mem::take(&mut c.open);
            open.into_values()
                .filter_map(|c| {
                    c.outbox.close();
                    c.writer
                })
                .collect()
        };
        // Each writer ends after its queue or WRITE_TIMEOUT, whichever first.
        for w in writers {
            let _ = w.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct AcceptCtx {
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<Connections>>,
    dispatch: Arc<dyn Dispatch>,
    requests: Arc<AtomicU64>,
    limits: Limits,
}

impl AcceptCtx {
    /// Makes room for a new client in a full server: closes the client
    /// idle longest, if one has been idle for the idle timeout. Returns
    /// whether a slot was freed.
    fn evict_idle(&self, c: &mut Connections) -> bool {
        let now = std::time::Instant::now();
        let idlest = c
            .open
            .iter()
            // A regular slot is what the newcomer needs: the spare does not
            // free one.
            .filter(|(_, conn)| !conn.shutdown_only)
            .filter_map(|(k, conn)| conn.outbox.idle_for(now, conn.opened).map(|d| (d, *k)))
            .filter(|(d, _)| *d >= self.limits.idle_timeout)
            .max();
        let Some((idle, key)) = idlest else {
            return false;
        };
        if let Some(conn) = c.open.remove(&key) {
            log::info!("api: closing a client idle for {idle:?} to serve a new one");
            let e = ApiError::new(
                ErrorCode::Busy,
                format!(
                    "closed after {:.1} s without a request: a new client needed the connection",
                    idle.as_secs_f32()
                ),
            );
            conn.outbox.push(protocol::reply(&Value::Null, &Err(e)));
            conn.outbox.close();
            // Ends its reader (blocked in read) at once.
            let _ = conn.outbox.stream.shutdown(std::net::Shutdown::Read);
        }
        true
    }

    fn run(self, listener: UnixListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            match stream {
                Ok(s) => {
                    if let Err(e) = self.serve(s) {
                        log::warn!("api: cannot serve a client: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("api: accept: {e}");
                    // Out of file descriptors, say: do not spin.
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn serve(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut c = lock(&self.conns);
        let regular = c.open.values().filter(|x| !x.shutdown_only).count();
        let spare_taken = c.open.values().any(|x| x.shutdown_only);
        let mut shutdown_only = false;
        if regular >= MAX_CONNECTIONS && !self.evict_idle(&mut c) {
            if spare_taken {
                drop(c);
                let e = ApiError::new(ErrorCode::Busy, "too many API connections");
                let mut s = stream;
                let _ = writeln!(s, "{}", protocol::reply(&Value::Null, &Err(e)));
                return Ok(());
            }
            shutdown_only = true;
        }
        let (tx, rx) = mpsc::sync_channel(OUTBOX_LINES);
        let outbox = Arc::new(Outbox {
            tx,
            stream: stream.try_clone()?,
            order: Mutex::default(),
        });
        outbox.push(protocol::greeting());
        let key = c.next;
        c.next += 1;
        let write_stream = stream.try_clone()?;
        let writer = thread::Builder::new()
            .name("api-writer".into())
            .spawn(move || {
                // Runs under the `api` filter it inherits.
                crate::seccomp::inherited();
                write_loop(write_stream, rx)
            })?;
        c.open.insert(
            key,
            Conn {
                outbox: outbox.clone(),
                writer: Some(writer),
                opened: std::time::Instant::now(),
                shutdown_only,
            },
        );
        drop(c);
        let reader = Reader {
            key,
            outbox,
            shutdown_only,
            conns: self.conns.clone(),
            dispatch: self.dispatch.clone(),
            requests: self.requests.clone(),
        };
        let spawned = thread::Builder::new()
            .name("api-reader".into())
            .spawn(move || {
                // Runs under the `api` filter it inherits.
                crate::seccomp::inherited();
                reader.run(stream)
            });
        if let Err(e) = spawned {
            if let Some(conn) = lock(&self.conns).open.remove(&key) {
                conn.outbox.close();
            }
            return Err(e);
        }
        Ok(())
    }
}

fn write_loop(mut stream: UnixStream, rx: Receiver<Outgoing>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Outgoing::Line(mut line) => {
                line.push('\n');
                if stream.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
            Outgoing::Close => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// How reading one request line ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads up to a newline into `buf` (newline dropped), refusing lines longer
/// than `max` without buffering more than `max` plus one read's worth.
pub(crate) fn read_line_capped(
    r: &mut impl BufRead,
    max: usize,
    buf: &mut Vec<u8>,
) -> io::Result<LineRead> {
    buf.clear();
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + chunk > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&avail[..chunk]);
        r.consume(if done { chunk + 1 } else { chunk });
        if done {
            return Ok(LineRead::Line);
        }
    }
}

struct Reader {
    key: u64,
    outbox: Arc<Outbox>,
    /// The spare connection of a full server: `vm.shutdown` only.
    shutdown_only: bool,
    conns: Arc<Mutex<Connections>>,
    dispatch: Arc<dyn Dispatch>,
    requests: Arc<AtomicU64>,
}

impl Reader {
    fn run(self, stream: UnixStream) {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            match read_line_capped(&mut r, MAX_REQUEST_BYTES, &mut buf) {
                Ok(LineRead::Line) => {
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    let req = parse_request(&buf);
                    let responder = Responder {
                        id: req.id,
                        seq: self.outbox.next_request(),
                        outbox: Some(self.outbox.clone()),
                    };
                    match req.command {
                        Ok(cmd) if self.shutdown_only && !matches!(cmd, Command::VmShutdown) => {
                            responder.error(
                                ErrorCode::Busy,
                                format!(
                                    "all {MAX_CONNECTIONS} API connections are in use; this \
                                     spare one takes only vm.shutdown"
                                ),
                            )
                        }
                        Ok(cmd) => self.dispatch.dispatch(cmd, responder),
                        Err(e) => responder.reply(Err(e)),
                    }
                }
                Ok(LineRead::TooLong) => {
                    let e = ApiError::bad_request(format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes; closing"
                    ));
                    let seq = self.outbox.next_request();
                    self.outbox
                        .reply(seq, protocol::reply(&Value::Null, &Err(e)), true);
                    break;
                }
                Ok(LineRead::Eof) | Err(_) => break,
            }
        }
        // No more events for this client. Replies still owed go out: the
        // writer ends when the last Responder (holding the outbox) is done,
        // so a client that half-closes after its request still gets it.
        lock(&self.conns).open.remove(&self.key);
    }
}
