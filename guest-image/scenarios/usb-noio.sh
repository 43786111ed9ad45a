# The NOIO guarantee under the conditions it exists for: the VMM's swap
# goes through the USB disk's own I/O volume (swap_volume=), guest RAM is
# overcommitted (a resident limit well below what the guest uses), and the
# disk autosuspends between bursts of I/O. Each cycle:
#   - memory pressure: a slice of a tmpfs file larger than the limit is read
#     (swap-ins) and a scratch slice rewritten (dirty pages to write back);
#   - checksummed O_DIRECT I/O on the disk (resumes it if asleep), and every
#     noio_reset_every cycles a bus reset (`sg_reset -b`: port reset path);
#   - the disk autosuspends (port U3, its volume - the swap volume - is
#     quiesced); the guest says USB-NOIO-SLEEPING n=N; and holds still while
#     the L1 script pushes every xHCI structure out to swap (debug.evict), so
#     the resume the next cycle starts must fault on them.
# At the end the pressure file must checksum as written.
# Parameters:
#   noio_serial=ID        the disk (noio)
#   noio_cycles=N         (100)
#   noio_pressure_mib=N   tmpfs file read in slices (96)
#   noio_slice_mib=N      slice read and scratch written per cycle (4)
#   noio_hold_s=SECONDS   stillness after each SLEEPING marker (2)
#   noio_delay_ms=MS      autosuspend delay of the disk and device (300)
#   noio_reset_every=N    bus reset every N cycles (10)
#   noio_wait=SECONDS     bound on each wait (60)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
s=$(param noio_serial noio)
cycles=$(param noio_cycles 100)
pmib=$(param noio_pressure_mib 96)
slice=$(param noio_slice_mib 4)
hold=$(param noio_hold_s 2)
delay=$(param noio_delay_ms 300)
reset_every=$(param noio_reset_every 10)
wait_s=$(param noio_wait 60)
command -v sg_reset >/dev/null || fail "sg_reset is not in the image"


d=$(usb_wait_dev "$s" "$wait_s") || fail "disk $s did not appear"
udev=$(usb_dev_dir "$d")
sg=$(ls "/sys/block/$d/device/scsi_generic" 2>/dev/null)
[ -c "/dev/$sg" ] || fail "no sg device for $d ($sg)"
mount -o remount,size=$((pmib + slice + 32))m /tmp || fail "cannot grow /tmp"
dd if=/dev/urandom of=/tmp/pressure bs=1M count="$pmib" 2>/dev/null || fail "cannot write the pressure file"
want=$(md5sum < /tmp/pressure | cut -d' ' -f1)
echo "USB-NOIO-SETUP dev=$d sg=$sg pressure_mib=$pmib md5=$want"
msg=$(usb_autosuspend_on "$d" "$delay") || fail "$msg"

n=1
resets=0
while [ "$n" -le "$cycles" ]; do
    off=$(((n * slice) % pmib))
    dd if=/tmp/pressure of=/dev/null bs=1M skip="$off" count="$slice" 2>/dev/null ||
        fail "cycle $n: pressure read failed"
    dd if=/dev/urandom of=/tmp/scratch bs=1M count="$slice" conv=notrunc 2>/dev/null ||
        fail "cycle $n: scratch write failed"
    usb_write_check "$d" $((n % 32 + 1)) 1 "c$n" || fail "cycle $n: data check on $d failed"
    rm -f "/tmp/pat.c$n"
    if [ $((n % reset_every)) -eq 0 ]; then
        sg_reset -b "/dev/$sg" || fail "cycle $n: sg_reset -b failed"
        resets=$((resets + 1))
        usb_write_check "$d" 40 1 "r$n" || fail "cycle $n: I/O after the bus reset failed"
        rm -f "/tmp/pat.r$n"
    fi
    usb_wait_file_is "$udev/power/runtime_status" suspended "$wait_s" ||
        fail "cycle $n: $udev did not autosuspend ($(cat "$udev/power/runtime_status"))"
    echo "USB-NOIO-SLEEPING n=$n;"
    sleep "$hold"
    n=$((n + 1))
done
now=$(md5sum < /tmp/pressure | cut -d' ' -f1)
[ "$now" = "$want" ] || fail "the pressure file changed while paged: $now != $want"
seen=$(dmesg | grep -c "reset SuperSpeed USB device")
echo "USB-NOIO-CYCLES n=$cycles io=ok pressure=ok resets=$resets seen_resets=$seen"
[ "$seen" -ge "$resets" ] || fail "$resets bus resets sent, dmesg shows $seen port resets"
echo "usb-noio: ok"
