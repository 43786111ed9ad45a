# USB port resets from the guest during I/O: while a large O_DIRECT write
# (then a read) runs on each disk, `sg_reset -b` asks usb-storage for a bus
# reset, which resets the USB port (usb_reset_device: "reset SuperSpeed /
# high-speed USB device" in dmesg). The I/O must complete and the data read
# back must match; dmesg must show the resets.
# Parameters:
#   reset_disks=SERIAL:SPEED[,...]  disks (SPEED 480 or 5000)
#   reset_mib=N                     MiB written and read per disk (32)
#   resets=N                        resets sent during each transfer (3)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mib=$(param reset_mib 32)
resets=$(param resets 3)
command -v sg_reset >/dev/null || fail "sg_reset is not in the image"

# reset_during PID SG: up to $resets bus resets, 0.5 s apart, while PID
# runs; prints how many were issued while it still ran.
reset_during() {
    k=0
    while [ "$k" -lt "$resets" ]; do
        sleep 0.5
        kill -0 "$1" 2>/dev/null || break
        sg_reset -b "/dev/$2" >&2 || echo "sg_reset -b /dev/$2 failed" >&2
        k=$((k + 1))
    done
    echo "$k"
}

for spec in $(param reset_disks "" | tr ',' ' '); do
    serial=${spec%%:*}
    speed=${spec#*:}
    d=$(usb_wait_dev "$serial" 60) || fail "disk $serial did not appear"
    [ "$(usb_speed "$d")" = "$speed" ] || fail "disk $serial runs at $(usb_speed "$d") Mb/s"
    sg=$(ls "/sys/block/$d/device/scsi_generic" 2>/dev/null)
    [ -c "/dev/$sg" ] || fail "no sg device for $d ($sg)"
    if [ "$speed" = 5000 ]; then kind=SuperSpeed; else kind=high-speed; fi
    before=$(dmesg | grep -c "reset $kind USB device")

    dd if=/dev/urandom of="/tmp/pat.$serial" bs=1M count="$mib" 2>/dev/null
    dd if="/tmp/pat.$serial" of="/dev/$d" bs=64k oflag=direct 2>/tmp/dd.err &
    pid=$!
    sent_w=$(reset_during "$pid" "$sg")
    wait "$pid" || fail "write to $d failed across port resets: $(cat /tmp/dd.err)"

    dd if="/dev/$d" of="/tmp/back.$serial" bs=64k count=$((mib * 16)) iflag=direct 2>/tmp/dd.err &
    pid=$!
    sent_r=$(reset_during "$pid" "$sg")
    wait "$pid" || fail "read from $d failed across port resets: $(cat /tmp/dd.err)"
    cmp -s "/tmp/pat.$serial" "/tmp/back.$serial" || fail "data on $d differ after port resets"
    # And once more with the device quiet after the resets.
    usb_read_check "$d" 0 "$mib" "$serial" || fail "re-read of $d failed"

    seen=$(($(dmesg | grep -c "reset $kind USB device") - before))
    echo "USB-RESET serial=$serial dev=$d speed=$speed sent_write=$sent_w sent_read=$sent_r seen=$seen io=ok"
    [ $((sent_w + sent_r)) -gt 0 ] || fail "$d: the transfers ended before any reset was sent"
    [ "$seen" -ge $((sent_w + sent_r)) ] ||
        fail "$d: $((sent_w + sent_r)) resets sent, dmesg shows $seen port resets"
    echo "USB-GUEST-MD5 $serial $(md5sum < "/tmp/pat.$serial" | cut -d' ' -f1)"
done
dmesg | grep -E "reset .* USB device|usb-storage|sd [0-9]" | tail -n 20
echo "usb-reset: ok"
