# Free page reporting: fill fill_mib MiB of tmpfs, say BALLOON-FILLED, wait
# hold_s seconds (L1 samples the host's residency), free it, say
# BALLOON-FREED, and stay up watch_s seconds while L1 watches the host's
# residency fall as the guest reports the free blocks.
# Parameters: fill_mib=N (512) hold_s=N (4) watch_s=N (20)
. /lib/guest/lib.sh
fill_mib=$(param fill_mib 512)
hold_s=$(param hold_s 4)
watch_s=$(param watch_s 20)
up() { cut -d' ' -f1 /proc/uptime; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
mount -o remount,size=$((fill_mib + 64))m /tmp || fail "cannot grow /tmp"
# Let the first reporting pass after boot finish before measuring.
sleep "$hold_s"
echo "BALLOON-BASELINE up=$(up)"
sleep "$hold_s"
dd if=/dev/zero of=/tmp/fill bs=1M count="$fill_mib" 2>/dev/null || fail "fill failed"
echo "BALLOON-FILLED up=$(up) mib=$fill_mib"
sleep "$hold_s"
rm -f /tmp/fill
echo "BALLOON-FREED up=$(up)"
sleep "$watch_s"
echo "BALLOON-REPORT-DONE up=$(up)"
