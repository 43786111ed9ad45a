//! Round trips over a real Unix socket against the server with a fake
//! command handler.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::protocol::MAX_REQUEST_BYTES;
use super::server::{read_line_capped, Limits, LineRead, MAX_CONNECTIONS};
use super::*;

struct Fake;

impl Dispatch for Fake {
    fn dispatch(&self, command: Command, responder: Responder) {
        match command {
            // Answered later from another thread, as the VMM thread does.
            Command::VmShutdown => {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    responder.reply(Ok(json!({"stopping": true})));
                });
            }
            // Dropped unanswered: the server must still reply.
            Command::UsbList => drop(responder),
            Command::UsbDetach(UsbTarget::Port(9)) => {
                responder.error(ErrorCode::NotFound, "no device on port 9")
            }
            other => responder.reply(Ok(json!({"echo": format!("{other:?}")}))),
        }
    }
}

fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vmm-api-test-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &PathBuf) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    /// Connects and checks the greeting.
    fn greeted(path: &PathBuf) -> Self {
        let mut c = Self::connect(path);
        let g = c.line().expect("greeting");
        assert_eq!(g["hello"]["version"], json!(1));
        c
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// The next line, or None at EOF.
    fn line(&mut self) -> Option<Value> {
        let mut s = String::new();
        match self.reader.read_line(&mut s).unwrap() {
            0 => None,
            _ => Some(serde_json::from_str(&s).unwrap()),
        }
    }

    fn call(&mut self, text: &str) -> Value {
        self.send(text);
        self.line().expect("reply")
    }
}

fn server() -> (ApiServer, PathBuf) {
    let path = socket_path();
    let s = ApiServer::start(&path, Arc::new(Fake)).unwrap();
    (s, path)
}

#[test]
fn request_reply_errors_and_events_round_trip() {
    let (server, path) = server();
    let mut c = Client::greeted(&path);
    let r = c.call(r#"{"id":1,"cmd":"vm.info"}"#);
    assert_eq!(r, json!({"id":1,"ok":{"echo":"VmInfo"}}));
    let r = c.call(r#"{"id":2,"cmd":"usb.attach","args":{"path":"/x.raw","port":5}}"#);
    assert_eq!(r["id"], json!(2));
    assert!(r["ok"]["echo"].as_str().unwrap().contains("port: Some(5)"));
    // Errors from the handler, from parsing, and for malformed JSON.
    let r = c.call(r#"{"id":3,"cmd":"usb.detach","args":{"port":9}}"#);
    assert_eq!(r["error"]["code"], json!("not_found"));
    let r = c.call(r#"{"id":4,"cmd":"nope"}"#);
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (json!(4), json!("bad_request"))
    );
    let r = c.call("{\"id\":5,");
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (Value::Null, json!("bad_request"))
    );
    // A dropped responder still answers, with internal.
    let r = c.call(r#"{"id":6,"cmd":"usb.list"}"#);
    assert_eq!(
        (r["id"].clone(), r["error"]["code"].clone()),
        (json!(6), json!("internal"))
    );
    // Blank lines are ignored; the connection still works afterwards.
    c.send("");
    let r = c.call(r#"{"id":7,"cmd":"vm.info"}"#);
    assert_eq!(r["id"], json!(7));
    // Events reach every client.
    let mut c2 = Client::greeted(&path);
    server
        .events()
        .emit("usb.attached", json!({"id":"u1","port":5}));
    for cl in [&mut c, &mut c2] {
        let e = cl.line().unwrap();
        assert_eq!(e["event"], json!("usb.attached"));
        assert_eq!(e["data"], json!({"id":"u1","port":5}));
        assert!(e["ts_us"].as_u64().unwrap() > 1_600_000_000_000_000);
    }
    assert_eq!(server.requests(), 7);
    server.shutdown();
    assert!(c.line().is_none(), "closed at shutdown");
    assert!(!path.exists(), "socket file removed");
}

#[test]
fn oversized_request_is_refused_and_the_connection_closed() {
    let (server, path) = server();
    let mut c = Client::greeted(&path);
    let big = format!(
        r#"{{"id":1,"cmd":"vm.info","args":{{"pad":"{}"}}}}"#,
        "x".repeat(MAX_REQUEST_BYTES)
    );
    // The server may close before reading it all; ignore write errors.
    let _ = c.stream.write_all(big.as_bytes());
    let r = c.line().expect("error reply");
    assert_eq!(r["error"]["code"], json!("bad_request"));
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("longer than"));
    assert!(c.line().is_none(), "connection closed");
    // The server still serves others.
    let mut c2 = Client::greeted(&path);
    assert_eq!(c2.call(r#"{"id":2,"cmd":"vm.info"}"#)["id"], json!(2));
    server.shutdown();
}

#[test]
fn connection_cap_keeps_a_spare_for_shutdown_then_answers_busy() {
    let (server, path) = server();
    let clients: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| Client::greeted(&path))
        .collect();
    // The spare connection: greeted, but it takes only vm.shutdown.
    let mut spare = Client::greeted(&path);
    let r = spare.call(r#"{"id":1,"cmd":"vm.info"}"#);
    assert_eq!(r["error"]["code"], json!("busy"), "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("only vm.shutdown"));
    let mut extra = Client::connect(&path);
    let r = extra.line().expect("busy reply");
    assert_eq!(r["error"]["code"], json!("busy"));
    assert!(extra.line().is_none());
    let r = spare.call(r#"{"id":2,"cmd":"vm.shutdown"}"#);
    assert_eq!(r, json!({"id":2,"ok":{"stopping":true}}));
    drop(clients);
    // Slots come back once clients leave (their readers see EOF).
    let mut ok = None;
    for _ in 0..100 {
        let mut c = Client::greeted(&path);
        if c.call(r#"{"id":3,"cmd":"vm.info"}"#).get("ok").is_some() {
            ok = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok.is_some(), "no slot freed");
    server.shutdown();
}

#[test]
fn idle_clients_make_room_for_a_new_one() {
    let path = socket_path();
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
    };
    let server = ApiServer::start_with(&path, Arc::new(Fake), limits).unwrap();
    let mut idle: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| Client::greeted(&path))
        .collect();
    // One keeps talking; the others go quiet past the timeout.
    std::thread::sleep(Duration::from_millis(200));
    let busy_one = idle.len() - 1;
    assert_eq!(
        idle[busy_one].call(r#"{"id":1,"cmd":"vm.info"}"#)["id"],
        json!(1)
    );
    std::thread::sleep(Duration::from_millis(200));
    // Two newcomers take two idle clients' slots (not the spare) and can
    // do anything, vm.shutdown included.
    let mut newcomers = Vec::new();
    for id in [2, 3] {
        newcomers.push(Client::greeted(&path));
        let c = newcomers.last_mut().unwrap();
        let r = c.call(&format!(r#"{{"id":{id},"cmd":"vm.info"}}"#));
        assert_eq!(r["id"], json!(id), "{r}");
        assert!(r.get("ok").is_some(), "a full slot, not the spare: {r}");
        let r = c.call(r#"{"id":"s","cmd":"vm.shutdown"}"#);
        assert!(r.get("ok").is_some(), "{r}");
    }
    // Exactly two of the quiet ones were told why, and closed.
    let mut closed = 0;
    for c in &mut idle[..busy_one] {
        c.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut s = String::new();
        if let Ok(n) = c.reader.read_line(&mut s) {
            if n > 0 {
                let v: Value = serde_json::from_str(&s).unwrap();
                assert_eq!(v["error"]["code"], json!("busy"), "{v}");
                assert!(v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("without a request"));
                assert!(c.line().is_none(), "closed after the notice");
                closed += 1;
            }
        }
    }
    assert_eq!(closed, 2);
    // The one that talked is still served.
    assert_eq!(
        idle[busy_one].call(r#"{"id":4,"cmd":"vm.info"}"#)["id"],
        json!(4)
    );
    server.shutdown();
}

#[test]
fn an_idle_spare_connection_does_not_make_a_regular_slot() {
    let path = socket_path();
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
    };
    let server = ApiServer::start_with(&path, Arc::new(Fake), limits).unwrap();
    let mut regular: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| Client::greeted(&path))
        .collect();
    let mut spare = Client::greeted(&path);
    // The regular clients keep talking; the spare goes quiet.
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        for c in &mut regular {
            assert_eq!(
                c.call(&format!(r#"{{"id":{round},"cmd":"vm.info"}}"#))["id"],
                json!(round)
            );
        }
    }
    let mut extra = Client::connect(&path);
    let r = extra.line().expect("busy reply");
    assert_eq!(r["error"]["code"], json!("busy"), "{r}");
    assert!(extra.line().is_none());
    let r = spare.call(r#"{"id":"s","cmd":"vm.shutdown"}"#);
    assert!(
        r.get("ok").is_some(),
        "the spare still serves vm.shutdown: {r}"
    );
    server.shutdown();
}

#[test]
fn pipelined_replies_keep_request_order() {
    let (server, path) = server();
    let mut c = Client::greeted(&path);
    // vm.shutdown is answered 50 ms later from another thread; the others
    // at once (an echo, a parse error, an unknown command, a dropped
    // responder), yet every reply leaves in request order.
    let lines = [
        r#"{"id":1,"cmd":"vm.shutdown"}"#,
        r#"{"id":2,"cmd":"vm.info"}"#,
        "{\"id\":3,",
        r#"{"id":4,"cmd":"nope"}"#,
        r#"{"id":5,"cmd":"usb.list"}"#,
        r#"{"id":6,"cmd":"vm.shutdown"}"#,
        r#"{"id":7,"cmd":"vm.info"}"#,
    ];
    c.stream
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .unwrap();
    let ids: Vec<Value> = (0..lines.len())
        .map(|_| c.line().unwrap()["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            json!(1),
            json!(2),
            Value::Null,
            json!(4),
            json!(5),
            json!(6),
            json!(7)
        ]
    );
    server.shutdown();
}

#[test]
fn half_closed_client_still_gets_a_late_reply() {
    let (server, path) = server();
    let mut c = Client::greeted(&path);
    c.send(r#"{"id":"s","cmd":"vm.shutdown"}"#);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let r = c.line().expect("reply after half-close");
    assert_eq!(r, json!({"id":"s","ok":{"stopping":true}}));
    assert!(c.line().is_none());
    server.shutdown();
}

#[test]
fn live_socket_is_not_stolen_and_stale_one_is_replaced() {
    let (server, path) = server();
    assert!(matches!(
        ApiServer::start(&path, Arc::new(Fake)),
        Err(ServerError::InUse { .. })
    ));
    // A stale socket file (no listener) is replaced.
    let stale = socket_path();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let s2 = ApiServer::start(&stale, Arc::new(Fake)).unwrap();
    let mut c = Client::greeted(&stale);
    assert_eq!(c.call(r#"{"id":1,"cmd":"vm.info"}"#)["id"], json!(1));
    s2.shutdown();
    server.shutdown();
}

#[test]
fn capped_line_reader() {
    let mut buf = Vec::new();
    let mut r = BufReader::with_capacity(4, &b"ab\ncdefgh\nij"[..]);
    assert_eq!(
        read_line_capped(&mut r, 6, &mut buf).unwrap(),
        LineRead::Line
    );
    assert_eq!(buf, b"ab");
    assert_eq!(
        read_line_capped(&mut r, 6, &mut buf).unwrap(),
        LineRead::Line
    );
    assert_eq!(buf, b"cdefgh");
    assert_eq!(
        read_line_capped(&mut r, 6, &mut buf).unwrap(),
        LineRead::Line
    );
    assert_eq!(buf, b"ij");
    assert_eq!(
        read_line_capped(&mut r, 6, &mut buf).unwrap(),
        LineRead::Eof
    );
    let mut r = BufReader::with_capacity(4, &b"abcdefg\n"[..]);
    assert_eq!(
        read_line_capped(&mut r, 6, &mut buf).unwrap(),
        LineRead::TooLong
    );
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(
        rest.len() <= 4,
        "at most one read past the cap was buffered"
    );
}
