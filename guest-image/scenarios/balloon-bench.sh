# Balloon benchmark (driven from L1, ours and QEMU alike): touch nearly all
# free memory and free it (BALLOON-TOUCHED), wait until the host's balloon
# of balloon_mib MiB is in (MemTotal drops; BALLOON-GUEST-INFLATED) and out
# again (BALLOON-GUEST-DEFLATED), then fill fill_mib MiB of tmpfs
# (BALLOON-FILLED), wait hold_s, free it (BALLOON-FREED) and stay up
# watch_s seconds while free page reporting returns it.
# Parameters: balloon_mib=N (512) fill_mib=N (512) hold_s=N (3)
# watch_s=N (20) wait_s=N (300)
. /lib/guest/lib.sh
balloon_mib=$(param balloon_mib 512)
fill_mib=$(param fill_mib 512)
hold_s=$(param hold_s 3)
watch_s=$(param watch_s 20)
wait_s=$(param wait_s 300)
up() { cut -d' ' -f1 /proc/uptime; }
memtotal_kb() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
touch_mib=$(($(awk '/^MemFree:/{print $2}' /proc/meminfo) / 1024 - 64))
mount -o remount,size=$((touch_mib + 8))m /tmp || fail "cannot grow /tmp"
dd if=/dev/zero of=/tmp/touch bs=1M count="$touch_mib" 2>/dev/null || echo "BALLOON-TOUCH-SHORT"
rm -f /tmp/touch
full=$(memtotal_kb)
echo "BALLOON-TOUCHED up=$(up) mib=$touch_mib"
wait_memtotal() {
    i=0
    while [ "$i" -lt $((wait_s * 4)) ]; do
        [ "$(memtotal_kb)" -"$1" "$2" ] && return 0
        sleep 0.25
        i=$((i + 1))
    done
    return 1
}
wait_memtotal le $((full - (balloon_mib - 8) * 1024)) || fail "the balloon did not inflate"
echo "BALLOON-GUEST-INFLATED up=$(up) memtotal_kb=$(memtotal_kb)"
wait_memtotal ge $((full - 4096)) || fail "the balloon did not deflate"
echo "BALLOON-GUEST-DEFLATED up=$(up)"
mount -o remount,size=$((fill_mib + 64))m /tmp || fail "cannot resize /tmp"
dd if=/dev/zero of=/tmp/fill bs=1M count="$fill_mib" 2>/dev/null || fail "fill failed"
echo "BALLOON-FILLED up=$(up)"
sleep "$hold_s"
rm -f /tmp/fill
echo "BALLOON-FREED up=$(up)"
sleep "$watch_s"
echo "BALLOON-BENCH-DONE up=$(up)"
