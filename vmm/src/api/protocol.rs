//! The wire protocol of the control API: newline-delimited JSON objects.
//!
//! - greeting (server, once): `{"hello":{"version":1,"commands":[..],"events":[..]}}`
//! - request: `{"id":N,"cmd":"usb.attach","args":{..}}` (`args` optional)
//! - reply: `{"id":N,"ok":{..}}` or `{"id":N,"error":{"code":"..","message":".."}}`
//! - event: `{"event":"usb.attached","ts_us":N,"data":{..}}`
//!
//! Everything here is pure parsing and formatting, testable without sockets.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Protocol version in the greeting; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Command names, as sent in `cmd`.
pub mod cmd {
    pub const VM_INFO: &str = "vm.info";
    pub const VM_SHUTDOWN: &str = "vm.shutdown";
    pub const USB_ATTACH: &str = "usb.attach";
    pub const USB_DETACH: &str = "usb.detach";
    pub const USB_LIST: &str = "usb.list";
    pub const USB_WAKE: &str = "usb.wake";
    pub const BALLOON_SET: &str = "balloon.set";
    pub const BALLOON_STATS: &str = "balloon.stats";
    /// Test aid: push guest pages out to swap.
    pub const DEBUG_EVICT: &str = "debug.evict";
    pub const ALL: &[&str] = &[
        VM_INFO,
        VM_SHUTDOWN,
        USB_ATTACH,
        USB_DETACH,
        USB_LIST,
        USB_WAKE,
        BALLOON_SET,
        BALLOON_STATS,
        DEBUG_EVICT,
    ];
}

/// Event names, as sent in `event`.
pub mod event {
    pub const USB_ATTACHED: &str = "usb.attached";
    pub const USB_DETACHED: &str = "usb.detached";
    pub const ALL: &[&str] = &[USB_ATTACHED, USB_DETACHED];
}

/// Error classes a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown command, bad or missing arguments.
    BadRequest,
    /// The named object (device id, port) does not exist.
    NotFound,
    /// The request collides with existing state (id or port taken).
    Conflict,
    /// The VM is not in a state that allows the request.
    InvalidState,
    /// Too many requests or connections; retry later.
    Busy,
    Timeout,
    /// The VMM failed (e.g. an image that cannot be opened).
    Internal,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Causes, outermost first (omitted when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            chain: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// An error whose message is `err` and whose chain lists its sources.
    pub fn from_error(code: ErrorCode, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = Vec::new();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push(s.to_string());
            source = s.source();
        }
        Self {
            code,
            message: err.to_string(),
            chain,
        }
    }
}

/// `usb.attach` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbAttachArgs {
    pub path: PathBuf,
    #[serde(default)]
    pub port: Option<u8>,
    #[serde(default)]
    pub readonly: Option<bool>,
    #[serde(default)]
    pub id: Option<String>,
}

/// Which device `usb.detach` / `usb.wake` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbTarget {
    Id(String),
    Port(u8),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsbTargetArgs {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    port: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// A size: bytes as a number, or a string with a K/M/G/T suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeArg {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonSetArgs {
    size: SizeArg,
}

/// A parsed, validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    VmInfo,
    VmShutdown,
    UsbAttach(UsbAttachArgs),
    UsbDetach(UsbTarget),
    UsbList,
    /// A host-side remote-wake request for a suspended disk.
    UsbWake(UsbTarget),
    /// The balloon's new size in bytes (memory held back from the guest).
    BalloonSet {
        size: u64,
    },
    /// Fresh guest statistics and the host's view.
    BalloonStats,
    /// Test aid: evict guest pages to swap.
    DebugEvict(EvictTarget),
}

/// What `debug.evict` pushes out: a guest-physical range, or every structure
/// the xHCI controller reads from guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictTarget {
    Range { gpa: u64, len: u64 },
    Xhci,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictArgs {
    #[serde(default)]
    gpa: Option<u64>,
    #[serde(default)]
    len: Option<u64>,
    #[serde(default)]
    device: Option<String>,
}

fn evict_target(name: &str, a: Value) -> Result<EvictTarget, ApiError> {
    match args::<EvictArgs>(name, a)? {
        EvictArgs {
            gpa: Some(gpa),
            len: Some(len),
            device: None,
        } if len > 0 => Ok(EvictTarget::Range { gpa, len }),
        EvictArgs {
            gpa: None,
            len: None,
            device: Some(d),
        } if d == "xhci" => Ok(EvictTarget::Xhci),
        _ => Err(ApiError::bad_request(format!(
            "{name}: give gpa and len (len > 0), or device \"xhci\""
        ))),
    }
}

/// `{"id": ...}` or `{"port": ...}`, exactly one.
fn usb_target(name: &str, a: Value) -> Result<UsbTarget, ApiError> {
    match args::<UsbTargetArgs>(name, a)? {
        UsbTargetArgs {
            id: Some(id),
            port: None,
        } => Ok(UsbTarget::Id(id)),
        UsbTargetArgs {
            id: None,
            port: Some(p),
        } => Ok(UsbTarget::Port(p)),
        _ => Err(ApiError::bad_request(format!(
            "{name}: give exactly one of id and port"
        ))),
    }
}

fn args<T: for<'de> Deserialize<'de>>(name: &str, args: Value) -> Result<T, ApiError> {
    serde_json::from_value(args).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}

impl Command {
    /// Builds a command from its name and `args` object.
    pub fn parse(name: &str, a: Value) -> Result<Self, ApiError> {
        match name {
            cmd::VM_INFO => args::<NoArgs>(name, a).map(|_| Self::VmInfo),
            cmd::VM_SHUTDOWN => args::<NoArgs>(name, a).map(|_| Self::VmShutdown),
            cmd::USB_LIST => args::<NoArgs>(name, a).map(|_| Self::UsbList),
            cmd::USB_ATTACH => {
                let a: UsbAttachArgs = args(name, a)?;
                if a.path.as_os_str().is_empty() {
                    return Err(ApiError::bad_request("usb.attach: path is empty"));
                }
                Ok(Self::UsbAttach(a))
            }
            cmd::USB_DETACH => usb_target(name, a).map(Self::UsbDetach),
            cmd::USB_WAKE => usb_target(name, a).map(Self::UsbWake),
            cmd::BALLOON_STATS => args::<NoArgs>(name, a).map(|_| Self::BalloonStats),
            cmd::BALLOON_SET => {
                let a: BalloonSetArgs = args(name, a)?;
                let size = match a.size {
                    SizeArg::Bytes(n) => Some(n),
                    SizeArg::Text(t) => crate::config::parse_size(&t),
                };
                match size {
                    Some(size) => Ok(Self::BalloonSet { size }),
                    None => Err(ApiError::bad_request(
                        "balloon.set: size is bytes or a size like 768M",
                    )),
                }
            }
            cmd::DEBUG_EVICT => evict_target(name, a).map(Self::DebugEvict),
            _ => Err(ApiError::bad_request(format!(
                "unknown command '{name}' (commands: {})",
                cmd::ALL.join(", ")
            ))),
        }
    }
}

/// A request line parsed as far as it could be: the id to answer with (null
/// when none could be read) and the command or why it is unusable.
#[derive(Debug)]
pub struct Request {
    pub id: Value,
    pub command: Result<Command, ApiError>,
}

/// Parses one request line. Never fails: problems become an error to reply.
pub fn parse_request(line: &[u8]) -> Request {
    let bad = |id: Value, msg: String| Request {
        id,
        command: Err(ApiError::bad_request(msg)),
    };
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return bad(Value::Null, format!("malformed JSON: {e}")),
    };
    let Value::Object(mut obj) = value else {
        return bad(Value::Null, "a request is a JSON object".into());
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    if !(id.is_null() || id.is_u64() || id.is_i64() || id.is_string()) {
        return bad(Value::Null, "id must be a number or a string".into());
    }
    let name = match obj.remove("cmd") {
        Some(Value::String(s)) => s,
        Some(_) => return bad(id, "cmd must be a string".into()),
        None => return bad(id, "missing cmd".into()),
    };
    let a = match obj.remove("args") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return bad(id, "args must be an object".into()),
    };
    if let Some(k) = obj.keys().next() {
        return bad(id, format!("unknown request field '{k}'"));
    }
    Request {
        id,
        command: Command::parse(&name, a),
    }
}

/// The greeting line.
pub fn greeting() -> String {
    json!({"hello": {
        "version": PROTOCOL_VERSION,
        "commands": cmd::ALL,
        "events": event::ALL,
    }})
    .to_string()
}

/// A reply line.
pub fn reply(id: &Value, result: &Result<Value, ApiError>) -> String {
    match result {
        Ok(v) => json!({"id": id, "ok": v}),
        Err(e) => json!({"id": id, "error": e}),
    }
    .to_string()
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An event line.
pub fn event_line(name: &str, ts_us: u64, data: &Value) -> String {
    json!({"event": name, "ts_us": ts_us, "data": data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_code(line: &str) -> (Value, ErrorCode, String) {
        let r = parse_request(line.as_bytes());
        let e = r.command.expect_err(line);
        (r.id, e.code, e.message)
    }

    #[test]
    fn well_formed_requests() {
        let r = parse_request(br#"{"id":7,"cmd":"vm.info"}"#);
        assert_eq!(r.id, json!(7));
        assert_eq!(r.command, Ok(Command::VmInfo));
        let r = parse_request(
            br#"{"id":"a","cmd":"usb.attach","args":{"path":"/i.raw","port":5,"readonly":true}}"#,
        );
        assert_eq!(r.id, json!("a"));
        assert_eq!(
            r.command,
            Ok(Command::UsbAttach(UsbAttachArgs {
                path: "/i.raw".into(),
                port: Some(5),
                readonly: Some(true),
                id: None,
            }))
        );
        let r = parse_request(br#"{"id":1,"cmd":"usb.detach","args":{"id":"x"}}"#);
        assert_eq!(r.command, Ok(Command::UsbDetach(UsbTarget::Id("x".into()))));
        let r = parse_request(br#"{"cmd":"debug.evict","args":{"device":"xhci"}}"#);
        assert_eq!(r.command, Ok(Command::DebugEvict(EvictTarget::Xhci)));
        let r = parse_request(br#"{"cmd":"debug.evict","args":{"gpa":4096,"len":8192}}"#);
        assert_eq!(
            r.command,
            Ok(Command::DebugEvict(EvictTarget::Range {
                gpa: 4096,
                len: 8192
            }))
        );
        let r = parse_request(br#"{"id":2,"cmd":"usb.wake","args":{"id":"x"}}"#);
        assert_eq!(r.command, Ok(Command::UsbWake(UsbTarget::Id("x".into()))));
        let r = parse_request(br#"{"cmd":"usb.detach","args":{"port":2}}"#);
        assert_eq!(r.id, Value::Null);
        assert_eq!(r.command, Ok(Command::UsbDetach(UsbTarget::Port(2))));
        let r = parse_request(br#"{"id":2,"cmd":"usb.list","args":null}"#);
        assert_eq!(r.command, Ok(Command::UsbList));
        let r = parse_request(br#"{"id":3,"cmd":"balloon.set","args":{"size":"768M"}}"#);
        assert_eq!(r.command, Ok(Command::BalloonSet { size: 768 << 20 }));
        let r = parse_request(br#"{"id":3,"cmd":"balloon.set","args":{"size":4096}}"#);
        assert_eq!(r.command, Ok(Command::BalloonSet { size: 4096 }));
        let r = parse_request(br#"{"id":4,"cmd":"balloon.stats"}"#);
        assert_eq!(r.command, Ok(Command::BalloonStats));
    }

    #[test]
    fn malformed_requests_become_bad_request_errors() {
        let (id, code, msg) = err_code("{not json");
        assert_eq!((id, code), (Value::Null, ErrorCode::BadRequest));
        assert!(msg.starts_with("malformed JSON"), "{msg}");
        assert_eq!(err_code("[1,2]").1, ErrorCode::BadRequest);
        assert_eq!(err_code(r#"{"id":[1],"cmd":"vm.info"}"#).0, Value::Null);
        // The id is echoed whenever it could be read.
        assert_eq!(err_code(r#"{"id":3}"#).0, json!(3));
        assert_eq!(err_code(r#"{"id":3,"cmd":5}"#).0, json!(3));
        let (_, _, msg) = err_code(r#"{"id":4,"cmd":"vm.explode"}"#);
        assert!(msg.contains("unknown command 'vm.explode'"), "{msg}");
        let (_, _, msg) = err_code(r#"{"id":4,"cmd":"vm.info","extra":1}"#);
        assert!(msg.contains("unknown request field 'extra'"), "{msg}");
        // Arguments are typed and unknown ones are refused.
        assert_eq!(
            err_code(r#"{"id":5,"cmd":"vm.info","args":{"x":1}}"#).1,
            ErrorCode::BadRequest
        );
        err_code(r#"{"id":5,"cmd":"usb.attach","args":{}}"#);
        err_code(r#"{"id":5,"cmd":"usb.attach","args":{"path":""}}"#);
        err_code(r#"{"id":5,"cmd":"usb.attach","args":{"path":"/a","port":300}}"#);
        err_code(r#"{"id":5,"cmd":"usb.attach","args":{"path":"/a","colour":"red"}}"#);
        err_code(r#"{"id":5,"cmd":"usb.attach","args":"/a"}"#);
        err_code(r#"{"id":6,"cmd":"usb.detach","args":{}}"#);
        err_code(r#"{"id":6,"cmd":"usb.detach","args":{"id":"a","port":1}}"#);
        err_code(r#"{"id":6,"cmd":"usb.wake","args":{}}"#);
        err_code(r#"{"id":7,"cmd":"balloon.set","args":{}}"#);
        err_code(r#"{"id":7,"cmd":"balloon.set","args":{"size":"lots"}}"#);
        err_code(r#"{"id":7,"cmd":"balloon.set","args":{"size":-1}}"#);
        err_code(r#"{"id":7,"cmd":"balloon.set","args":{"size":1,"wait":true}}"#);
        err_code(r#"{"id":7,"cmd":"balloon.stats","args":{"x":1}}"#);
        err_code(r#"{"id":6,"cmd":"debug.evict","args":{"gpa":4096}}"#);
        err_code(r#"{"id":6,"cmd":"debug.evict","args":{"gpa":4096,"len":0}}"#);
        err_code(r#"{"id":6,"cmd":"debug.evict","args":{"device":"virtio"}}"#);
    }

    #[test]
    fn reply_event_and_greeting_shapes() {
        let ok: Value = serde_json::from_str(&reply(&json!(9), &Ok(json!({"a":1})))).unwrap();
        assert_eq!(ok, json!({"id":9,"ok":{"a":1}}));
        let mut e = ApiError::new(ErrorCode::NotFound, "no such device");
        let line = reply(&json!(9), &Err(e.clone()));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"id":9,"error":{"code":"not_found","message":"no such device"}})
        );
        e.chain.push("cause".into());
        let v: Value = serde_json::from_str(&reply(&Value::Null, &Err(e))).unwrap();
        assert_eq!(v["error"]["chain"], json!(["cause"]));
        let v: Value = serde_json::from_str(&event_line("usb.attached", 5, &json!({}))).unwrap();
        assert_eq!(v, json!({"event":"usb.attached","ts_us":5,"data":{}}));
        let g: Value = serde_json::from_str(&greeting()).unwrap();
        assert_eq!(g["hello"]["version"], json!(1));
        assert_eq!(g["hello"]["commands"].as_array().unwrap().len(), 9);
        assert!(!greeting().contains('\n') && !reply(&json!(1), &Ok(json!("a\nb"))).contains('\n'));
    }
}
