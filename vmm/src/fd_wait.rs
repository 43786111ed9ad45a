//! Waiting for a file descriptor to become readable (poll(2)), for threads
//! that block on one non-blocking fd: an eventfd, a terminal.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Whether `fd` has input (or EOF/hang-up) within `timeout` (`None`: wait
/// as long as it takes). EINTR is retried.
pub fn readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Ok(false),
            _ => return Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn an_eventfd_becomes_readable_when_written() {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(!readable(e.as_raw_fd(), Some(Duration::from_millis(10))).unwrap());
        let w = e.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.write(1).unwrap();
        });
        assert!(readable(e.as_raw_fd(), None).unwrap());
        assert_eq!(e.read().unwrap(), 1);
        t.join().unwrap();
    }
}
