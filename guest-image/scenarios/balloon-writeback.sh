# The same workload with and without a balloon under the pager: cycles
# times, write cycle_mib MiB to tmpfs and delete it. Without a balloon the
# guest spreads the cycles over all its free memory, and the host pager
# must write the stale pages back to keep under its limit; with a balloon
# holding most of guest RAM the guest reuses the pages it has left. With
# a balloon, wait first until it holds at least want_mib MiB.
# Parameters: cycles=N (4) cycle_mib=N (200) want_mib=N (0) wait_s=N (300)
. /lib/guest/lib.sh
cycles=$(param cycles 4)
cycle_mib=$(param cycle_mib 200)
want_mib=$(param want_mib 0)
wait_s=$(param wait_s 300)
up() { cut -d' ' -f1 /proc/uptime; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
total_kb() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
if [ "$want_mib" -gt 0 ]; then
    i=0
    # MemTotal (without deflate-on-OOM the driver takes the balloon out of
    # it) must fall below the guest's RAM minus want_mib.
    while [ "$(total_kb)" -gt $(($(param mem_kb 1048576) - want_mib * 1024)) ]; do
        [ "$i" -lt "$wait_s" ] || fail "the balloon did not inflate (MemTotal $(total_kb) kB)"
        sleep 1
        i=$((i + 1))
    done
fi
echo "BALLOON-WB-START up=$(up) memtotal_kb=$(total_kb)"
mount -o remount,size=$((cycle_mib + 32))m /tmp || fail "cannot grow /tmp"
n=1
while [ "$n" -le "$cycles" ]; do
    dd if=/dev/zero of=/tmp/cycle bs=1M count="$cycle_mib" 2>/dev/null || fail "cycle $n: write failed"
    rm -f /tmp/cycle
    n=$((n + 1))
done
echo "BALLOON-WB-DONE up=$(up) cycles=$cycles"
