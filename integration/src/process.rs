//! Runs a child process (QEMU or the VMM) with a deadline, capturing its
//! console (stdout + stderr) and the time at which marker lines appear.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

/// How often the deadline is checked while the child runs.
const POLL: Duration = Duration::from_millis(50);
/// Time given to the reader threads to drain the pipes after the child ended.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("cannot start {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {cmd} failed")]
    Wait {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// A marker line seen on the console, with the time since launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub line: String,
}

/// What a bounded run produced.
#[derive(Debug)]
pub struct Captured {
    /// `None` when the child was killed on timeout.
    pub status: Option<ExitStatus>,
    pub console: String,
    pub wall: Duration,
    pub timed_out: bool,
    /// Stopped because a [`Silence`] probe found it wedged.
    pub wedged: bool,
    /// That probe also found the wedge to be the emulator's
    /// ([`Probe::emulator_fault`]).
    pub emulator_fault: bool,
    /// Lines that contain one of the requested markers, in order.
    pub events: Vec<Event>,
}

/// What a [`Silence`] probe found out about a child that printed nothing.
#[derive(Debug, Default)]
pub struct Probe {
    /// Appended to the console, one `[harness]` line per line.
    pub report: String,
    /// The child can no longer make progress: stop it now.
    pub wedged: bool,
    /// The wedge is in a state no correct machine stays in (the monitor's
    /// `emulator_fault`): not the code under test.
    pub emulator_fault: bool,
}

/// Asked each time the child has been silent for `after`.
#[derive(Clone, Copy)]
pub struct Silence<'a> {
    pub after: Duration,
    pub probe: &'a dyn Fn() -> Probe,
}

/// Options for [`run_bounded`].
#[derive(Clone, Copy)]
pub struct RunOptions<'a> {
    pub timeout: Duration,
    /// Copy the console to our stdout as it arrives.
    pub echo: bool,
    /// Substrings whose lines are time-stamped into [`Captured::events`].
    pub markers: &'a [&'a str],
    /// Give the child our stdin (interactive consoles) instead of none.
    pub inherit_stdin: bool,
    /// What to ask when the child has printed nothing for a while.
    pub silence: Option<Silence<'a>>,
}

enum Chunk {
    Data(Instant, Vec<u8>),
    Eof,
}

fn reader(mut src: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Chunk::Data(Instant::now(), buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Chunk::Eof);
    })
}

/// Collects chunks into the console and time-stamps marker lines.
struct Collector<'a> {
    start: Instant,
    /// When the child last printed anything (start until it does).
    heard: Instant,
    console: Vec<u8>,
    line: Vec<u8>,
    events: Vec<Event>,
    opts: &'a RunOptions<'a>,
}

impl Collector<'_> {
    fn take(&mut self, at: Instant, data: &[u8]) {
        self.heard = at;
        if self.opts.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data);
            let _ = out.flush();
        }
        self.console.extend_from_slice(data);
        for &b in data {
            if b == b'\n' {
                self.end_line(at);
            } else {
                self.line.push(b);
            }
        }
    }

    /// Adds the harness's own lines (never markers) on lines of their own,
    /// to the record only: an echoed console is someone's terminal, where a
    /// report every minute of an idle login prompt would only be noise.
    fn note(&mut self, text: &str) {
        if !self.line.is_empty() {
            // End the partial line first (it may hold a marker).
            self.console.push(b'\n');
            self.end_line(Instant::now());
        }
        for l in text.lines() {
            self.console
                .extend_from_slice(format!("[harness] {l}\n").as_bytes());
        }
    }

    fn end_line(&mut self, at: Instant) {
        let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
        self.line.clear();
        if self.opts.markers.iter().any(|m| text.contains(m)) {
            self.events.push(Event {
                at: at.duration_since(self.start),
                line: text,
            });
        }
    }
}

/// Runs `cmd` (stdin null unless `opts.inherit_stdin`, stdout and stderr
/// captured) until it exits or the
/// timeout passes; on timeout the child is killed and reaped.
pub fn run_bounded(cmd: &mut Command, opts: &RunOptions) -> Result<Captured, ProcessError> {
    let name = format!("{:?}", cmd.get_program());
    let start = Instant::now();
    let mut child = cmd
        .stdin(if opts.inherit_stdin {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            cmd: format!("{cmd:?}"),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(reader(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(reader(err, tx.clone()));
    }
    drop(tx);
    let mut col = Collector {
        start,
        heard: start,
        console: Vec::new(),
        line: Vec::new(),
        events: Vec::new(),
        opts,
    };
    let deadline = start + opts.timeout;
    let mut timed_out = false;
    let mut wedged = false;
    let mut emulator_fault = false;
    let status = loop {
        while let Ok(chunk) = rx.try_recv() {
            if let Chunk::Data(at, data) = chunk {
                col.take(at, &data);
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(source) => return Err(ProcessError::Wait { cmd: name, source }),
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Some(silence) = opts.silence {
            if col.heard.elapsed() >= silence.after {
                let probe = (silence.probe)();
                col.note(&probe.report);
                // The next look comes after another full silence.
                col.heard = Instant::now();
                if probe.wedged {
                    wedged = true;
                    emulator_fault = probe.emulator_fault;
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        }
        match rx.recv_timeout(POLL) {
            Ok(Chunk::Data(at, data)) => col.take(at, &data),
            Ok(Chunk::Eof) | Err(_) => {}
        }
    };
    let wall = start.elapsed();
    // Drain what is left; bounded in case a grandchild holds the pipe.
    let drain_end = Instant::now() + DRAIN;
    let mut open = readers.len();
    while open > 0 {
        let left = drain_end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Chunk::Data(at, data)) => col.take(at, &data),
            Ok(Chunk::Eof) => open -= 1,
            Err(_) => break,
        }
    }
    if open == 0 {
        for r in readers {
            let _ = r.join();
        }
    }
    if !col.line.is_empty() {
        col.end_line(Instant::now());
    }
    Ok(Captured {
        status,
        console: String::from_utf8_lossy(&col.console).into_owned(),
        wall,
        timed_out,
        wedged,
        emulator_fault,
        events: col.events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(timeout: Duration) -> RunOptions<'static> {
        RunOptions {
            timeout,
            echo: false,
            markers: &["MARK"],
            inherit_stdin: false,
            silence: None,
        }
    }

    #[test]
    fn a_silent_child_is_probed_and_stopped_when_wedged() {
        let calls = std::cell::Cell::new(0);
        let probe = || {
            calls.set(calls.get() + 1);
            Probe {
                report: format!("probe {}", calls.get()),
                wedged: calls.get() == 2,
                emulator_fault: calls.get() == 2,
            }
        };
        let c = run_bounded(
            Command::new("sh").args(["-c", "printf partial; exec sleep 30"]),
            &RunOptions {
                silence: Some(Silence {
                    after: Duration::from_millis(300),
                    probe: &probe,
                }),
                ..opts(Duration::from_secs(20))
            },
        )
        .unwrap();
        assert!(c.wedged && c.emulator_fault && !c.timed_out && c.status.is_none());
        assert_eq!(calls.get(), 2);
        assert!(c.wall < Duration::from_secs(10), "took {:?}", c.wall);
        assert!(
            c.console
                .ends_with("partial\n[harness] probe 1\n[harness] probe 2\n"),
            "{:?}",
            c.console
        );
    }

    #[test]
    fn a_child_that_keeps_talking_is_never_probed() {
        let probe = || -> Probe { panic!("probed a child that was talking") };
        let c = run_bounded(
            Command::new("sh").args(["-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.1; done"]),
            &RunOptions {
                silence: Some(Silence {
                    after: Duration::from_millis(400),
                    probe: &probe,
                }),
                ..opts(Duration::from_secs(20))
            },
        )
        .unwrap();
        assert!(!c.wedged && c.status.is_some_and(|s| s.success()));
    }

    #[test]
    fn captures_output_status_and_markers() {
        let c = run_bounded(
            Command::new("sh").args([
                "-c",
                // stdout and stderr reach the console in either order (two
                // pipes); only whole lines go to stderr so the marker line
                // cannot merge with a partial line from the other pipe.
                "echo hello; echo MARK one; echo on-stderr >&2; echo tail-no-newline | tr -d '\\n'; exit 7",
            ]),
            &opts(Duration::from_secs(10)),
        )
        .unwrap();
        assert!(!c.timed_out);
        assert_eq!(c.status.and_then(|s| s.code()), Some(7));
        assert!(c.console.contains("hello\n"));
        assert!(c.console.contains("on-stderr"));
        assert!(c.console.contains("tail-no-newline"));
        assert_eq!(c.events.len(), 1);
        assert_eq!(c.events[0].line, "MARK one");
    }

    #[test]
    fn kills_on_timeout() {
        let c = run_bounded(
            Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
            &opts(Duration::from_millis(500)),
        )
        .unwrap();
        assert!(c.timed_out);
        assert!(c.status.is_none());
        assert!(c.console.contains("started"));
        assert!(c.wall < Duration::from_secs(10), "took {:?}", c.wall);
    }

    #[test]
    fn missing_program_is_an_error() {
        let e = run_bounded(
            &mut Command::new("/nonexistent/qemu"),
            &opts(Duration::from_secs(1)),
        );
        assert!(matches!(e, Err(ProcessError::Spawn { .. })));
    }
}
