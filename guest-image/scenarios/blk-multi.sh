# Two virtio-blk disks at once, one read-only; PCI remove + rescan and
# driver unbind + bind of the writable disk keep its data and it keeps
# working. Disks are found by serial, not by name (a rescanned disk may be
# renamed). Prints "BLK-GUEST-MD5 <tag> <md5>" for ro (the read-only
# disk's first ro_mib MiB), before (pattern written before the removal)
# and after (pattern written after the rebind), for the host to compare.
# Parameters: rw_serial rw_bytes ro_serial ro_bytes ro_mib pat_mib
#   (the "before" pattern is at 0, the "after" pattern at pat_mib MiB)
. /lib/guest/lib.sh

rw_serial=$(require_param rw_serial) || exit 1
rw_bytes=$(require_param rw_bytes) || exit 1
ro_serial=$(require_param ro_serial) || exit 1
ro_bytes=$(require_param ro_bytes) || exit 1
ro_mib=$(require_param ro_mib) || exit 1
pat_mib=$(require_param pat_mib) || exit 1

# Bound on waiting for a disk to go or come back, in 0.2 s steps.
WAIT_STEPS=300

# disk_by_serial SERIAL: the vdX name whose serial is SERIAL (or nothing).
disk_by_serial() {
    for ds_d in /sys/block/vd*; do
        [ -e "$ds_d/serial" ] || continue
        [ "$(cat "$ds_d/serial")" = "$1" ] && { basename "$ds_d"; return 0; }
    done
    return 1
}
# wait_disk SERIAL present|absent
wait_disk() {
    wd_i=0
    while [ $wd_i -lt $WAIT_STEPS ]; do
        if disk_by_serial "$1" >/dev/null; then
            [ "$2" = present ] && return 0
        else
            [ "$2" = absent ] && return 0
        fi
        sleep 0.2
        wd_i=$((wd_i + 1))
    done
    fail "disk $1 still not $2 after $((WAIT_STEPS / 5)) s; block devices: $(ls /sys/block)"
}
# pci_of DISK: the PCI address of the disk's virtio device.
pci_of() { basename "$(dirname "$(readlink -f /sys/block/$1/device)")"; }
# check_disk NAME SERIAL BYTES RO (shell functions share variables: the
# locals are prefixed)
check_disk() {
    cd_size=$(blockdev --getsize64 /dev/$1)
    cd_ro=$(cat /sys/block/$1/ro)
    echo "blk: $1 serial=$2 size=$cd_size ro=$cd_ro pci=$(pci_of $1)"
    [ "$cd_size" = "$3" ] || fail "$1 is $cd_size bytes, expected $3"
    [ "$cd_ro" = "$4" ] || fail "$1 ro=$cd_ro, expected $4"
}

ls /sys/block
n=$(ls -d /sys/block/vd* | wc -l)
[ "$n" -eq 2 ] || fail "expected 2 virtio disks, found $n: $(ls /sys/block)"
rw=$(disk_by_serial "$rw_serial") || fail "no disk with serial $rw_serial"
ro=$(disk_by_serial "$ro_serial") || fail "no disk with serial $ro_serial"
[ "$rw" != "$ro" ] || fail "both serials on $rw"
check_disk "$rw" "$rw_serial" "$rw_bytes" 0
check_disk "$ro" "$ro_serial" "$ro_bytes" 1

# --- the read-only disk refuses writes and keeps its data ---
ro_md5=$(md5_range /dev/$ro 0 "$ro_mib")
echo "BLK-GUEST-MD5 ro $ro_md5"
if dd if=/dev/zero of=/dev/$ro bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/ro.err; then
    fail "a write to read-only $ro succeeded"
fi
echo "blk: write to $ro refused: $(cat /tmp/ro.err | head -n 1)"
if blkdiscard -o 0 -l 1048576 /dev/$ro 2>/tmp/ro.err; then
    fail "a discard on read-only $ro succeeded"
fi
echo "blk: discard on $ro refused: $(cat /tmp/ro.err | head -n 1)"
drop_caches
[ "$(md5_range /dev/$ro 0 "$ro_mib")" = "$ro_md5" ] || fail "read-only disk changed"

# --- data written before a PCI remove + rescan survives it ---
put_random /dev/$rw 0 "$pat_mib" /tmp/before
before=$(md5_of /tmp/before)
echo "BLK-GUEST-MD5 before $before"
bdf=$(pci_of "$rw")
[ -e /sys/bus/pci/devices/$bdf/remove ] || fail "no PCI device $bdf for $rw"
echo "blk: removing $bdf ($rw)"
echo 1 > /sys/bus/pci/devices/$bdf/remove || fail "PCI remove of $bdf failed"
wait_disk "$rw_serial" absent
[ ! -e /sys/bus/pci/devices/$bdf ] || fail "$bdf still present after remove"
echo "blk: rescanning"
echo 1 > /sys/bus/pci/rescan || fail "PCI rescan failed"
wait_disk "$rw_serial" present
rw=$(disk_by_serial "$rw_serial")
check_disk "$rw" "$rw_serial" "$rw_bytes" 0
got=$(md5_range /dev/$rw 0 "$pat_mib")
echo "blk: after rescan $rw ($(pci_of "$rw")) reads $got, wrote $before"
[ "$got" = "$before" ] || fail "data changed across PCI remove + rescan"

# --- driver unbind + bind (device reset) ---
bdf=$(pci_of "$rw")
drv=$(basename "$(readlink -f /sys/bus/pci/devices/$bdf/driver)")
echo "blk: unbinding $bdf from $drv"
echo "$bdf" > /sys/bus/pci/drivers/$drv/unbind || fail "unbind failed"
wait_disk "$rw_serial" absent
echo "$bdf" > /sys/bus/pci/drivers/$drv/bind || fail "bind failed"
wait_disk "$rw_serial" present
rw=$(disk_by_serial "$rw_serial")
got=$(md5_range /dev/$rw 0 "$pat_mib")
echo "blk: after rebind $rw reads $got"
[ "$got" = "$before" ] || fail "data changed across unbind + bind"

# --- the re-probed disk still writes ---
put_random /dev/$rw "$pat_mib" "$pat_mib" /tmp/after
after=$(md5_of /tmp/after)
drop_caches
got=$(md5_range /dev/$rw "$pat_mib" "$pat_mib")
[ "$got" = "$after" ] || fail "data written after rebind reads back as $got, wrote $after"
echo "BLK-GUEST-MD5 after $after"

# The other disk was untouched by all of this.
ro=$(disk_by_serial "$ro_serial") || fail "read-only disk vanished"
[ "$(md5_range /dev/$ro 0 "$ro_mib")" = "$ro_md5" ] || fail "read-only disk reads differently now"
if dmesg | grep -E 'I/O error|blk_update_request' | grep -v "$ro"; then
    fail "the kernel logged block I/O errors on the writable disk"
fi
echo "blk-multi: ok"
