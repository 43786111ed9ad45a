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
}

/// Answers one request. Dropping it unanswered replies `internal`.
pub struct Responder {
    id: Value,
    outbox: Option<Arc<Outbox>>,
}

impl Responder {
    pub fn reply(mut self, result: Result<Value, ApiError>) {
        if let Some(out) = self.outbox.take() {
            out.push(protocol::reply(&self.id, &result));
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
            out.push(protocol::reply(&self.id, &Err(e)));
        }
    }
}

#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, (Arc<Outbox>, Option<JoinHandle<()>>)>,
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
        for (out, _) in lock(&self.conns).open.values() {
            out.push(line.clone());
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
        let listener = bind(path)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Connections::default()));
        let requests = Arc::new(AtomicU64::new(0));
        let ctx = AcceptCtx {
            stopping: stopping.clone(),
            conns: conns.clone(),
            dispatch,
            requests: requests.clone(),
        };
        let accept = thread::Builder::new()
            .name("api".into())
            .spawn(move || ctx.run(listener))
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
                .filter_map(|(out, w)| {
                    out.close();
                    w
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
}

impl AcceptCtx {
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
        if c.open.len() >= MAX_CONNECTIONS {
            drop(c);
            let e = ApiError::new(ErrorCode::Busy, "too many API connections");
            let mut s = stream;
            let _ = writeln!(s, "{}", protocol::reply(&Value::Null, &Err(e)));
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(OUTBOX_LINES);
        let outbox = Arc::new(Outbox {
            tx,
            stream: stream.try_clone()?,
        });
        outbox.push(protocol::greeting());
        let key = c.next;
        c.next += 1;
        let write_stream = stream.try_clone()?;
        let writer = thread::Builder::new()
            .name("api-writer".into())
            .spawn(move || write_loop(write_stream, rx))?;
        c.open.insert(key, (outbox.clone(), Some(writer)));
        drop(c);
        let reader = Reader {
            key,
            outbox,
            conns: self.conns.clone(),
            dispatch: self.dispatch.clone(),
            requests: self.requests.clone(),
        };
        let spawned = thread::Builder::new()
            .name("api-reader".into())
            .spawn(move || reader.run(stream));
        if let Err(e) = spawned {
            if let Some((out, _)) = lock(&self.conns).open.remove(&key) {
                out.close();
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
                        outbox: Some(self.outbox.clone()),
                    };
                    match req.command {
                        Ok(cmd) => self.dispatch.dispatch(cmd, responder),
                        Err(e) => responder.reply(Err(e)),
                    }
                }
                Ok(LineRead::TooLong) => {
                    let e = ApiError::bad_request(format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes; closing"
                    ));
                    self.outbox.push(protocol::reply(&Value::Null, &Err(e)));
                    self.outbox.close();
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
