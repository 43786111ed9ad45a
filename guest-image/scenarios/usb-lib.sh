# Not a scenario: helpers the usb-* scenarios source. The nested USB tests
# copy this file into the L2 image as /lib/guest/usb.sh.
#
# Console markers from these scenarios are read by the L1 script that drives
# vmm-ctl, and by the test: usb_quiet keeps kernel messages off the console
# so that printk cannot split a marker line (dmesg still has them).

usb_quiet() {
    echo 1 > /proc/sys/kernel/printk
}

# usb_dev_dir SDX: the sysfs directory of the USB device behind a disk
# (/sys/block/sdX/device is <usbdev>/<intf>/hostN/targetN:0:0/N:0:0:0).
usb_dev_dir() {
    p=$(readlink -f "/sys/block/$1/device") || return 1
    dirname "$(dirname "$(dirname "$(dirname "$p")")")"
}

# usb_dev_of_serial SERIAL: the sdX whose USB device has that serial.
usb_dev_of_serial() {
    for b in /sys/block/sd*; do
        [ -e "$b" ] || continue
        u=$(usb_dev_dir "${b##*/}") || continue
        if [ "$(cat "$u/serial" 2>/dev/null)" = "$1" ]; then
            echo "${b##*/}"
            return 0
        fi
    done
    return 1
}

# usb_wait_dev SERIAL SECONDS: waits (bounded) until the disk with that
# serial has a block device with a non-zero size; prints its sdX.
usb_wait_dev() {
    i=0
    while [ "$i" -lt $(($2 * 4)) ]; do
        d=$(usb_dev_of_serial "$1") &&
            [ "$(cat "/sys/block/$d/size" 2>/dev/null || echo 0)" -gt 0 ] &&
            [ -b "/dev/$d" ] && { echo "$d"; return 0; }
        sleep 0.25
        i=$((i + 1))
    done
    return 1
}

# usb_wait_gone SDX SECONDS: waits (bounded) until /sys/block/SDX is gone.
usb_wait_gone() {
    i=0
    while [ "$i" -lt $(($2 * 4)) ]; do
        [ -e "/sys/block/$1" ] || return 0
        sleep 0.25
        i=$((i + 1))
    done
    return 1
}

# usb_speed SDX: the USB device's speed in Mb/s (480 high speed, 5000
# SuperSpeed).
usb_speed() {
    cat "$(usb_dev_dir "$1")/speed"
}

# usb_md5 FILE-OR-DEV [DD-ARGS...]: md5 of what dd reads.
usb_md5() {
    f=$1
    shift
    dd if="$f" "$@" 2>/dev/null | md5sum | cut -d' ' -f1
}

# usb_write_check SDX OFF_MIB MIB TAG: writes MIB MiB of random data at
# OFF_MIB with O_DIRECT, reads it back with O_DIRECT and compares. The
# pattern stays in /tmp/pat.TAG.
usb_write_check() {
    dd if=/dev/urandom of="/tmp/pat.$4" bs=1M count="$3" 2>/dev/null ||
        { echo "cannot make the pattern $4"; return 1; }
    dd if="/tmp/pat.$4" of="/dev/$1" bs=1M seek="$2" count="$3" oflag=direct 2>/dev/null ||
        { echo "write of $3 MiB at $2 MiB to $1 failed"; return 1; }
    usb_read_check "$1" "$2" "$3" "$4"
}

# usb_read_check SDX OFF_MIB MIB TAG: reads MIB MiB at OFF_MIB with O_DIRECT
# and compares them with /tmp/pat.TAG.
usb_read_check() {
    dd if="/dev/$1" of="/tmp/back.$4" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null ||
        { echo "read of $3 MiB at $2 MiB from $1 failed"; return 1; }
    cmp -s "/tmp/pat.$4" "/tmp/back.$4" ||
        { echo "data read back from $1 at $2 MiB differ from what was written ($4)"; return 1; }
    rm -f "/tmp/back.$4"
}

# usb_wait_file_is FILE VALUE SECONDS: bounded poll (every 50 ms) until FILE
# holds VALUE (sysfs power/runtime_status and the like).
usb_wait_file_is() {
    i=0
    while [ "$i" -lt $(($3 * 20)) ]; do
        [ "$(cat "$1" 2>/dev/null)" = "$2" ] && return 0
        sleep 0.05
        i=$((i + 1))
    done
    return 1
}

# usb_autosuspend_on SDX DELAY_MS: power/control=auto and the autosuspend
# delay on the disk's SCSI device and on its USB device (what TLP or
# powertop do).
usb_autosuspend_on() {
    u=$(usb_dev_dir "$1") || { echo "no USB device behind $1"; return 1; }
    for p in "/sys/block/$1/device/power" "$u/power"; do
        echo "$2" > "$p/autosuspend_delay_ms" || { echo "cannot set $p/autosuspend_delay_ms"; return 1; }
        echo auto > "$p/control" || { echo "cannot set $p/control"; return 1; }
    done
}

# usb_roothubs_eager: root hubs suspend as soon as their ports do.
usb_roothubs_eager() {
    for h in /sys/bus/usb/devices/usb*; do
        echo 0 > "$h/power/autosuspend_delay_ms"
    done
}
