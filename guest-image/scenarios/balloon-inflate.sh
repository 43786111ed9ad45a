# Balloon inflate/deflate (driven from L1 through vmm-ctl balloon.set):
# touch touch_mib MiB of guest memory and free it again (host-resident but
# free in the guest), say BALLOON-TOUCHED, wait until the balloon has taken
# at least want_mib MiB (MemTotal drops: without deflate-on-OOM the driver
# takes inflated pages out of it), then until it is back, then fill fill_mib
# MiB (more than was free while inflated) with a random 4 MiB block repeated
# and compare every copy with the block.
# Parameters: touch_mib=N (default: MemFree - 64 MiB, nearly every free
# page; less headroom has the OOM killer take init) want_mib=N (700)
# fill_mib=N (400)
# wait_s=SECONDS (300)
. /lib/guest/lib.sh
touch_mib=$(param touch_mib $(($(awk '/^MemFree:/{print $2}' /proc/meminfo) / 1024 - 64)))
want_mib=$(param want_mib 700)
fill_mib=$(param fill_mib 400)
wait_s=$(param wait_s 300)
up() { cut -d' ' -f1 /proc/uptime; }
memtotal_kb() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
mount -o remount,size=$((touch_mib + 8))m /tmp || fail "cannot grow /tmp"
dd if=/dev/zero of=/tmp/touch bs=1M count="$touch_mib" 2>/dev/null ||
    echo "BALLOON-TOUCH-SHORT at $(($(stat -c %s /tmp/touch) >> 20)) MiB"
rm -f /tmp/touch
full=$(memtotal_kb)
echo "BALLOON-TOUCHED up=$(up) mib=$touch_mib memtotal_kb=$full"

# wait_memtotal CMP KB: until MemTotal CMP KB (lt or ge), at most wait_s.
wait_memtotal() {
    i=0
    while [ "$i" -lt "$wait_s" ]; do
        m=$(memtotal_kb)
        [ "$m" -"$1" "$2" ] && return 0
        sleep 1
        i=$((i + 1))
    done
    return 1
}
wait_memtotal lt $((full - want_mib * 1024)) ||
    fail "the balloon did not take ${want_mib} MiB in ${wait_s}s (MemTotal $(memtotal_kb) kB)"
echo "BALLOON-GUEST-INFLATED up=$(up) memtotal_kb=$(memtotal_kb) free_kb=$(awk '/^MemFree:/{print $2}' /proc/meminfo)"
wait_memtotal ge $((full - 4096)) ||
    fail "the balloon did not give the memory back in ${wait_s}s (MemTotal $(memtotal_kb) kB)"
echo "BALLOON-GUEST-DEFLATED up=$(up) memtotal_kb=$(memtotal_kb)"

fill_pattern /tmp/fill "$fill_mib"
echo "BALLOON-FILLED up=$(up) mib=$fill_mib free_kb=$(awk '/^MemFree:/{print $2}' /proc/meminfo)"
check_pattern /tmp/fill "$fill_mib" "the data written after deflate"
echo "BALLOON-VERIFIED up=$(up) mib=$fill_mib"
