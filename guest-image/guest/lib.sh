# Shared helpers for guest init and scenario scripts (POSIX sh / busybox ash).
# Installed in the initramfs as /lib/guest/lib.sh; scenarios source it:
#   . /lib/guest/lib.sh

# param NAME [DEFAULT]: value of NAME=value on the kernel command line
# (CMDLINE_FILE overrides /proc/cmdline, for tests). Prints DEFAULT and
# succeeds when given and NAME is absent; fails otherwise.
param() {
    for kv in $(cat "${CMDLINE_FILE:-/proc/cmdline}"); do
        case "$kv" in
            "$1="*) echo "${kv#*=}"; return 0 ;;
        esac
    done
    if [ $# -ge 2 ]; then
        echo "$2"
        return 0
    fi
    return 1
}

# fail MESSAGE [RC]: print a diagnostic and exit the scenario with RC (1).
fail() {
    echo "FAIL: $1" >&2
    exit "${2:-1}"
}

# require_param NAME: value of NAME, or fail naming the missing parameter.
require_param() {
    param "$1" || fail "kernel command line lacks $1=..."
}

# status_byte RC: the one-byte status for the debug-exit port, 0 on success,
# clamped to 1..255 on failure.
status_byte() {
    if [ "$1" -eq 0 ]; then echo 0
    elif [ "$1" -gt 255 ]; then echo 255
    elif [ "$1" -lt 1 ]; then echo 1
    else echo "$1"
    fi
}

# console_drain [SECONDS]: wait (at most SECONDS, 10) until everything
# written to the console has left the UART. stty re-applies the console's
# own settings with TCSADRAIN, which returns once the tty buffer and the
# transmitter are empty. If that times out, the UART's transmit interrupts
# have stopped: say so through the kernel log, whose console writes poll
# the UART and so still get out, and fail.
console_drain() {
    dev=${CONSOLE_DEV:-/dev/console}
    mode=$(stty -F "$dev" -g 2>/dev/null) || return 0
    timeout "${1:-10}" stty -F "$dev" "$mode" 2>/dev/null && return 0
    {
        echo "<0>GUEST-CONSOLE-STALL: console output did not drain in ${1:-10}s"
        echo "<0>GUEST-CONSOLE-STALL: $(grep -i ttyS /proc/interrupts | tr -s ' ')"
    } > /dev/kmsg 2>/dev/null
    return 1
}

# report_status RC: write the status byte to I/O port 0xf4 (244), the
# VMM's debug-exit port; the VMM exits with that byte as its exit code.
# The VMM stops at once, so the console is drained first: lines still
# queued in the guest's tty would be lost.
report_status() {
    console_drain
    b=$(status_byte "$1")
    printf "\\$(printf %03o "$b")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
}

# hang_report SECONDS: what the kernel knows while a scenario hangs, for
# the log of a test that then times out: the tasks blocked in the kernel
# (sysrq w, into dmesg), the tail of dmesg, interrupt counts, processes.
# The init's watchdog calls it SECONDS after the scenario started.
hang_report() {
    echo "GUEST-WATCHDOG: the scenario still runs after ${1}s; kernel state follows"
    echo 1 > /proc/sys/kernel/sysrq 2>/dev/null &&
        echo w > /proc/sysrq-trigger 2>/dev/null
    echo "--- dmesg (last 120 lines):"
    dmesg 2>&1 | tail -n 120
    echo "--- /proc/interrupts:"
    cat /proc/interrupts 2>&1
    echo "--- processes:"
    ps 2>&1
    echo "GUEST-WATCHDOG: end of report"
}

# kernel_map: where this kernel's text and its modules sit (KASLR moves
# them each boot), so that an instruction address in a hang report (the
# harness's look at a wedged L1, a guest watchdog) can be resolved offline:
# kernel addresses by disassembling the (stripped) vmlinux at the same
# offset from _stext (Debian's System.map is a stub), module addresses
# against the symbols of the module's .ko file.
kernel_map() {
    t=$(grep -m1 -w '_stext' /proc/kallsyms 2>/dev/null | cut -d' ' -f1)
    m=$(awk '{ printf " %s=%s", $1, $6 }' /proc/modules 2>/dev/null)
    echo "text=${t:-?}${m}"
}

# md5_of FILE: md5 of a file's content.
md5_of() {
    md5sum < "$1" | cut -d' ' -f1
}

# md5_range DEV OFF_MIB LEN_MIB [buffered]: md5 of LEN_MIB MiB at OFF_MIB,
# read with O_DIRECT unless "buffered" (needed for /dev/zero and files).
md5_range() {
    if [ "${4:-direct}" = buffered ]; then
        dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum | cut -d' ' -f1
    else
        dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
    fi
}

# drop_caches: write back, then drop the page cache (reads hit the device).
drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

# put_random DEV OFF_MIB LEN_MIB FILE: LEN_MIB MiB of random data to FILE
# and to DEV at OFF_MIB (O_DIRECT, fsync'd); fails the scenario on error.
put_random() {
    dd if=/dev/urandom of="$4" bs=1M count="$3" 2>/dev/null || fail "no random data for $4"
    dd if="$4" of="$1" bs=1M seek="$2" oflag=direct conv=notrunc,fsync 2>/dev/null ||
        fail "writing $3 MiB at $2 MiB to $1 failed"
}

# fill_pattern FILE MIB: FILE becomes MIB MiB (a multiple of 4) of one random
# 4 MiB block repeated (kept in /tmp/blk for check_pattern); fails the
# scenario when the memory runs out first.
fill_pattern() {
    dd if=/dev/urandom of=/tmp/blk bs=1M count=4 2>/dev/null || fail "cannot make the pattern"
    pattern_of "$2" > "$1" || fail "fill failed at $(($(stat -c %s "$1") >> 20)) MiB"
}

# check_pattern FILE MIB WHAT: FILE still holds what fill_pattern wrote.
check_pattern() {
    diff=$(pattern_of "$2" | cmp - "$1" 2>&1) || fail "$3 reads back wrong: $diff"
}

pattern_of() {
    i=0
    while [ "$i" -lt $(($1 / 4)) ]; do
        cat /tmp/blk || return 1
        i=$((i + 1))
    done
}

# fio_job DEVICE NAME RW BS IODEPTH: one time-based fio job (libaio, O_DIRECT)
# on /dev/DEVICE using $FIO, $size (MiB) and $runtime (s); prints
# "FIO-RESULT job=NAME iops=N bw_kib=N" for the benchmark parsers.
fio_job() {
    $FIO --name="$2" --filename="/dev/$1" --rw="$3" --bs="$4" --iodepth="$5" \
        --ioengine=libaio --direct=1 --numjobs=1 --size="${size}M" \
        --runtime="$runtime" --ramp_time=1 --time_based \
        --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err ||
        { cat /tmp/fio.err; fail "fio $2 failed"; }
    # Terse v3: fields 7/8 are read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
    awk -F';' -v job="$2" -v rw="$3" '$1 == 3 {
        if (rw ~ /write/) { bw = $48; iops = $49 } else { bw = $7; iops = $8 }
        print "FIO-RESULT job=" job " iops=" iops " bw_kib=" bw
    }' /tmp/fio.out
    grep -q '^3;' /tmp/fio.out || { cat /tmp/fio.out /tmp/fio.err; fail "fio $2 printed no result"; }
}
