# The balloon as the first reclaim source (--balloon ...,auto=on): keep the
# host's pager writing to swap by rewriting a tmpfs file larger than its
# resident limit, until the policy's balloon has taken want_mib MiB out of
# MemTotal; then stop and wait until the policy, with the pressure gone,
# gives at least one step (64 MiB) back.
# Parameters: file_mib=N (320) want_mib=N (128) wait_s=N (240)
. /lib/guest/lib.sh
file_mib=$(param file_mib 320)
want_mib=$(param want_mib 128)
wait_s=$(param wait_s 240)
up() { cut -d' ' -f1 /proc/uptime; }
total_kb() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
start=$(total_kb)
mount -o remount,size=$((file_mib + 96))m /tmp || fail "cannot grow /tmp"
# Random data (the pager drops all-zero pages without writing them).
dd if=/dev/urandom of=/tmp/seed bs=1M count=32 2>/dev/null || fail "no seed"
echo "BALLOON-AUTO-START up=$(up) memtotal_kb=$start"
(
    while :; do
        : > /tmp/data
        i=0
        while [ "$i" -lt $((file_mib / 32)) ]; do
            cat /tmp/seed >> /tmp/data || exit 1
            i=$((i + 1))
        done
    done
) &
pid=$!
i=0
while [ "$(total_kb)" -gt $((start - want_mib * 1024)) ]; do
    [ "$i" -lt "$wait_s" ] || fail "under pressure the balloon took only $(((start - $(total_kb)) / 1024)) MiB in ${wait_s} s"
    kill -0 "$pid" 2>/dev/null || fail "the pressure loop died"
    sleep 1
    i=$((i + 1))
done
low=$(total_kb)
echo "BALLOON-AUTO-INFLATED up=$(up) memtotal_kb=$low taken_mib=$(((start - low) / 1024))"
kill "$pid"
wait "$pid" 2>/dev/null
rm -f /tmp/data
i=0
while [ "$(total_kb)" -lt $((low + 64 * 1024)) ]; do
    [ "$i" -lt "$wait_s" ] || fail "the balloon gave nothing back in ${wait_s} s without pressure"
    sleep 1
    i=$((i + 1))
done
echo "BALLOON-AUTO-DEFLATED up=$(up) memtotal_kb=$(total_kb)"
