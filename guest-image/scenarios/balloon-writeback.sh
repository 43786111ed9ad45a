# The same workload with and without a balloon under the host's pager:
# read the whole disk /dev/vda twice through the page cache and write
# tmpfs_mib MiB to tmpfs in between. Without a balloon the guest keeps the
# disk in its page cache (it has the memory), and the host's pager must
# write those pages to swap to stay under its limit; with a balloon holding
# most of guest RAM the guest drops its own clean cache instead (no host
# I/O). With a balloon, wait first until it holds at least want_mib MiB.
# Parameters: tmpfs_mib=N (128) want_mib=N (0) mem_kb=N (1048576)
# wait_s=N (300)
. /lib/guest/lib.sh
tmpfs_mib=$(param tmpfs_mib 128)
want_mib=$(param want_mib 0)
mem_kb=$(param mem_kb 1048576)
wait_s=$(param wait_s 300)
up() { cut -d' ' -f1 /proc/uptime; }
total_kb() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
i=0
while [ ! -b /dev/vda ]; do
    [ "$i" -lt 100 ] || fail "no /dev/vda"
    sleep 0.1
    i=$((i + 1))
done
if [ "$want_mib" -gt 0 ]; then
    # Without deflate-on-OOM the driver takes the balloon out of MemTotal.
    i=0
    while [ "$(total_kb)" -gt $((mem_kb - want_mib * 1024)) ]; do
        [ "$i" -lt "$wait_s" ] || fail "the balloon did not inflate (MemTotal $(total_kb) kB)"
        sleep 1
        i=$((i + 1))
    done
fi
echo "BALLOON-WB-START up=$(up) memtotal_kb=$(total_kb)"
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null || fail "first read of /dev/vda failed"
echo "BALLOON-WB-READ1 up=$(up) cached_kb=$(awk '/^Buffers:/{print $2}' /proc/meminfo)"
mount -o remount,size=$((tmpfs_mib + 32))m /tmp || fail "cannot grow /tmp"
dd if=/dev/zero of=/tmp/data bs=1M count="$tmpfs_mib" 2>/dev/null || fail "tmpfs write failed"
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null || fail "second read of /dev/vda failed"
echo "BALLOON-WB-DONE up=$(up) cached_kb=$(awk '/^Buffers:/{print $2}' /proc/meminfo)"
