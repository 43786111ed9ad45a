//! The control API's request parser: any line a client can send (up to
//! the server's line limit), parsed and validated, then answered. No VM:
//! the reply is what the server would send for a request it refuses, and
//! it must be one line of JSON carrying the request's id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmm::api::protocol::{parse_request, reply, ApiError, MAX_REQUEST_BYTES};

fuzz_target!(|line: &[u8]| {
    if line.len() > MAX_REQUEST_BYTES || line.contains(&b'\n') {
        return;
    }
    let request = parse_request(line);
    let result = match &request.command {
        Ok(command) => Ok(Value::String(format!("{command:?}"))),
        Err(e) => Err::<Value, ApiError>(e.clone()),
    };
    let out = reply(&request.id, &result);
    assert!(!out.contains('\n'), "a reply spans lines: {out}");
    let parsed: Value = serde_json::from_str(&out).expect("a reply is JSON");
    assert_eq!(parsed["id"], request.id, "the reply's id");
});
