//! The CMOS RTC (MC146818) at ports 0x70/0x71: wall-clock time for the guest
//! and 128 bytes of CMOS RAM.
//!
//! Without it, Linux reads 0xff for status register A, sees "update in
//! progress" forever and spins on the port for seconds at boot. Time is read
//! from the host clock on every access, in BCD, 24-hour mode, and no update
//! is ever in progress. Alarms and periodic interrupts are not emulated.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const REG_A_DEFAULT: u8 = 0x26;
/// 24-hour mode, BCD (DM bit 2 clear).
const REG_B_DEFAULT: u8 = 0x02;
/// Valid RAM and time (VRT).
const REG_D_VALID: u8 = 0x80;
/// The index port's bit 7 masks NMIs; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Cmos {
    pub fn new() -> Self {
        Self::default()
    }

    /// A CMOS whose clock reads seconds since the epoch from `now`.
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_DEFAULT;
        ram[usize::from(REG_D)] = REG_D_VALID;
        Self { index: 0, ram, now }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let t = civil_time((self.now)());
        let bcd = |v: u32| -> u8 { (((v / 10) << 4) | (v % 10)) as u8 };
        match reg {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday + 1),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd(t.year % 100),
            REG_CENTURY => bcd(t.year / 100),
            REG_A => REG_A_DEFAULT,
            REG_C => 0,
            REG_D => REG_D_VALID,
            r => self.ram[usize::from(r & INDEX_MASK)],
        }
    }
}

/// A UTC date and time broken into calendar fields.
#[derive(Debug, PartialEq, Eq)]
struct CivilTime {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
}

/// Converts seconds since 1970-01-01 UTC to calendar fields (proleptic
/// Gregorian; Howard Hinnant's days-to-civil algorithm).
fn civil_time(epoch: u64) -> CivilTime {
    let days = epoch / 86_400;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    CivilTime {
        year: year as u32,
        month: month as u32,
        day: day as u32,
        hour: (secs / 3600) as u32,
        minute: (secs / 60 % 60) as u32,
        second: (secs % 60) as u32,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4) % 7) as u32,
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            0 => self.index = b & INDEX_MASK,
            // Writes to the clock registers are ignored (the host clock rules);
            // the rest is plain CMOS RAM.
            1 if self.index > REG_D => self.ram[usize::from(self.index)] = b,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(CMOS_PORT, 0, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(CMOS_PORT, 1, &mut b);
        b[0]
    }

    #[test]
    fn civil_time_of_known_instants() {
        assert_eq!(
            civil_time(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 4
            }
        );
        // 2024-02-29 12:34:56 UTC, a Thursday.
        assert_eq!(
            civil_time(1_709_210_096),
            CivilTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 12,
                minute: 34,
                second: 56,
                weekday: 4
            }
        );
    }

    #[test]
    fn registers_read_bcd_time_and_never_update_in_progress() {
        let mut c = Cmos::with_clock(|| 1_709_210_096);
        assert_eq!(read(&mut c, REG_SECONDS), 0x56);
        assert_eq!(read(&mut c, REG_MINUTES), 0x34);
        assert_eq!(read(&mut c, REG_HOURS), 0x12);
        assert_eq!(read(&mut c, REG_DAY), 0x29);
        assert_eq!(read(&mut c, REG_MONTH), 0x02);
        assert_eq!(read(&mut c, REG_YEAR), 0x24);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "UIP must stay clear");
        assert_eq!(read(&mut c, REG_D), REG_D_VALID);
    }

    #[test]
    fn cmos_ram_is_writable_but_the_clock_is_not() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(CMOS_PORT, 0, &[0x40]);
        c.write(CMOS_PORT, 1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        c.write(CMOS_PORT, 0, &[REG_SECONDS]);
        c.write(CMOS_PORT, 1, &[0x33]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x00);
    }
}
