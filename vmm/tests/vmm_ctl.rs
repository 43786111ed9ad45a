//! `vmm-ctl` against the VMM's control loop with a real xHCI controller model
//! (no KVM): attach, list, detach, events, errors and shutdown over the
//! Unix socket, exactly as a user or a guest test drives them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use devices::pci::{MsiMessage, MsiRouter};
use devices::xhci::XhciPci;
use serde_json::{json, Value};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::control::{Control, VmFacts, VmHandler};
use vmm::usb::{xhci_config, UsbManager};
use vmm::vcpu::{StopReason, VmStop};

struct NoRouter;
impl MsiRouter for NoRouter {
    fn set_route(&self, _: u16, _: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
    fn fire(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-ctl-test-{}-{name}", std::process::id()))
}

/// Runs vmm-ctl; returns (exit code, stdout lines as JSON).
fn ctl(socket: &Path, args: &[&str]) -> (i32, Vec<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-ctl"))
        .arg("--socket")
        .arg(socket)
        .args(["--timeout", "10"])
        .args(args)
        .output()
        .expect("run vmm-ctl");
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

#[test]
fn hotplug_over_the_socket_with_vmm_ctl() {
    let socket = tmp("api.sock");
    let image = tmp("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let xhci = XhciPci::new(
        xhci_config(),
        GuestMemoryAtomic::new(mem),
        Arc::new(NoRouter),
    )
    .unwrap();
    let xhci = Arc::new(Mutex::new(xhci));
    let stop = VmStop::new().unwrap();
    let handler = VmHandler::new(
        Some(UsbManager::new(xhci.clone(), 3)),
        stop.clone(),
        VmFacts {
            cpus: 1,
            memory_bytes: 64 << 20,
        },
        None,
    );
    let control = Control::new(Some(&socket), handler).unwrap();
    let stop2 = stop.clone();
    let vmm_thread = thread::spawn(move || control.run_until_stopped(&stop2));

    // An event follower started first sees attach and detach. Its reply to
    // usb.list proves it is connected before anything happens.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_vmm-ctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["--events", "usb.list"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower_out = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&follower_out.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["ok"]["devices"], json!([]));

    let (code, out) = ctl(&socket, &["vm.info"]);
    assert_eq!(code, 0);
    assert_eq!(out[0]["ok"]["usb"]["usb3_ports"], json!([5, 6, 7, 8]));
    assert_eq!(out[0]["ok"]["usb"]["pci_address"], json!("0000:00:03.0"));

    let args = json!({"path": image, "id": "stick", "readonly": true}).to_string();
    let (code, out) = ctl(&socket, &["usb.attach", &args]);
    assert_eq!(code, 0, "{out:?}");
    let dev = &out[0]["ok"];
    assert_eq!(
        (
            dev["port"].clone(),
            dev["speed"].clone(),
            dev["size_bytes"].clone()
        ),
        (json!(5), json!("usb3"), json!(8 << 20))
    );
    assert_eq!(xhci.lock().unwrap().xhci().portsc(5).unwrap() & 1, 1, "CCS");

    // Same id again: conflict, exit status 1.
    let (code, out) = ctl(&socket, &["usb.attach", &args]);
    assert_eq!(code, 1);
    assert_eq!(out[0]["error"]["code"], json!("conflict"));
    let (code, out) = ctl(&socket, &["usb.list"]);
    assert_eq!(code, 0);
    assert_eq!(out[0]["ok"]["devices"][0]["id"], json!("stick"));
    assert_eq!(out[0]["ok"]["free_ports"], json!([1, 2, 3, 4, 6, 7, 8]));
    let (code, out) = ctl(&socket, &["usb.detach", r#"{"id":"stick"}"#]);
    assert_eq!((code, out[0]["ok"]["port"].clone()), (0, json!(5)));
    assert_eq!(xhci.lock().unwrap().xhci().portsc(5).unwrap() & 1, 0);
    let (code, out) = ctl(&socket, &["usb.detach", r#"{"port":5}"#]);
    assert_eq!(
        (code, out[0]["error"]["code"].clone()),
        (1, json!("not_found"))
    );
    let (code, out) = ctl(&socket, &["no.such"]);
    assert_eq!(
        (code, out[0]["error"]["code"].clone()),
        (1, json!("bad_request"))
    );
    let (code, _) = ctl(&socket, &["usb.list", "[1]"]);
    assert_eq!(code, 1, "non-object JSON-ARGS refused locally");

    // Shutdown: the reply arrives, the loop ends, the socket goes away.
    let (code, out) = ctl(&socket, &["vm.shutdown"]);
    assert_eq!((code, out[0]["ok"].clone()), (0, json!({})));
    let start = Instant::now();
    while !vmm_thread.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "control loop did not end"
        );
        thread::sleep(Duration::from_millis(20));
    }
    vmm_thread.join().unwrap();
    assert_eq!(stop.reason(), Some(StopReason::Guest(0)));
    assert!(!socket.exists());

    // The follower saw both events and ended when the socket closed.
    let events: Vec<Value> = follower_out
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(follower.wait().unwrap().success());
    let names: Vec<_> = events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(names, vec![json!("usb.attached"), json!("usb.detached")]);
    assert_eq!(events[0]["data"]["id"], json!("stick"));
    let _ = std::fs::remove_file(&image);
}
