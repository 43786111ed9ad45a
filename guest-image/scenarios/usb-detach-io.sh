# Hot-detach with guest I/O in flight: the guest writes a block, syncs it
# and prints its md5, then runs O_DIRECT writes and reads in a loop on
# another region of the disk and says USB-DETACH-WANT; the L1 script
# detaches the disk through vmm-ctl while that I/O runs. The I/O must fail
# in the guest (not hang), the disk must go away, and the guest goes on to
# power off normally (the VMM survived). The test compares the synced block
# with the image after the VMM exits.
# Parameters:
#   det_serial=ID     serial (vmm-ctl id) of the disk (det)
#   det_wait=SECONDS  bound on each wait (120)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
s=$(param det_serial det)
wait_s=$(param det_wait 120)

d=$(usb_wait_dev "$s" "$wait_s") || fail "disk $s did not appear"
usb_write_check "$d" 0 4 kept || fail "cannot write the block that must survive"
sync
echo "USB-GUEST-MD5 $s-kept $(md5sum < /tmp/pat.kept | cut -d' ' -f1)"
# Until a command fails; the bound only keeps a broken detach from looping
# forever (the wait below fails first).
(
    i=0
    while [ "$i" -lt 100000 ]; do
        dd if=/dev/urandom of="/dev/$d" bs=1M seek=8 count=16 oflag=direct 2>/dev/null || break
        dd if="/dev/$d" of=/dev/null bs=1M skip=8 count=16 iflag=direct 2>/dev/null || break
        i=$((i + 1))
    done
    echo "USB-DETACH-IO-END loops=$i"
) &
io=$!
sleep 2
echo "USB-DETACH-WANT"
usb_wait_gone "$d" "$wait_s" || fail "$d still there ${wait_s}s after the detach"
k=0
while kill -0 "$io" 2>/dev/null && [ "$k" -lt $((wait_s * 4)) ]; do
    sleep 0.25
    k=$((k + 1))
done
kill -0 "$io" 2>/dev/null && fail "guest I/O still running ${wait_s}s after the detach"
echo "USB-DETACH-DONE io=failed"
