# USB hotplug cycles driven by the L1 script through vmm-ctl: per cycle the
# guest asks for the disk (USB-HOT-WANT n=N;), waits for it to appear,
# checks that the block written in the previous cycle survived the detach
# and re-attach, writes and reads back a new block, says USB-HOT-DONE
# n=N;, and waits for the disk to go after L1 detaches it. A disk plugged
# at start is read every cycle and must not change.
# Parameters:
#   hot_serial=ID     serial (vmm-ctl id) of the hot-plugged disk (hot)
#   hot_cycles=N      cycles (20)
#   hot_wait=SECONDS  bound on each appear/disappear wait (90)
#   base_serial=ID    the disk plugged at start (base)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
hot=$(param hot_serial hot)
cycles=$(param hot_cycles 20)
wait_s=$(param hot_wait 90)
base=$(param base_serial base)

b=$(usb_wait_dev "$base" "$wait_s") || fail "base disk $base did not appear"
base_md5=$(usb_md5 "/dev/$b" bs=1M count=1 iflag=direct)
echo "USB-GUEST-MD5 $base-head $base_md5"

n=1
while [ "$n" -le "$cycles" ]; do
    echo "USB-HOT-WANT n=$n;"
    d=$(usb_wait_dev "$hot" "$wait_s") ||
        fail "cycle $n: disk $hot did not appear within ${wait_s}s"
    sp=$(usb_speed "$d")
    if [ "$n" -gt 1 ]; then
        usb_read_check "$d" $((n - 1)) 1 "hot$((n - 1))" ||
            fail "cycle $n: the block of cycle $((n - 1)) did not survive detach/attach"
    fi
    usb_write_check "$d" "$n" 1 "hot$n" || fail "cycle $n: data check on $d failed"
    now=$(usb_md5 "/dev/$b" bs=1M count=1 iflag=direct)
    [ "$now" = "$base_md5" ] || fail "cycle $n: base disk head changed ($now != $base_md5)"
    echo "USB-HOT-CYCLE n=$n; dev=$d speed=$sp io=ok"
    echo "USB-HOT-DONE n=$n;"
    usb_wait_gone "$d" "$wait_s" || fail "cycle $n: $d still there ${wait_s}s after detach"
    echo "USB-HOT-GONE n=$n;"
    n=$((n + 1))
done
i=1
: > /tmp/all
while [ "$i" -le "$cycles" ]; do
    cat "/tmp/pat.hot$i" >> /tmp/all
    i=$((i + 1))
done
echo "USB-GUEST-MD5 $hot-all $(md5sum < /tmp/all | cut -d' ' -f1)"
echo "USB-HOT-CYCLES-DONE=$cycles"
