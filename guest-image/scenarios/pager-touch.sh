# Overcommit check: touch touch_mib MiB of guest memory with a random pattern
# (far more than the VMM's resident limit, so the pager must swap) and verify
# every byte by checksum after it has been paged out and back in.
# Parameters: touch_mib=N (default 700)
. /lib/guest/lib.sh
mib=$(param touch_mib 700)
up() { cut -d' ' -f1 /proc/uptime; }
mount -o remount,size=$((mib + 64))m /tmp || fail "cannot grow /tmp"
echo "pager-touch: [$(up)] writing $mib MiB of random data to tmpfs"
dd if=/dev/urandom of=/tmp/pattern bs=1M count="$mib" 2>/dev/null ||
    fail "dd of the pattern failed"
echo "pager-touch: [$(up)] first checksum pass"
first=$(md5sum < /tmp/pattern)
echo "pager-touch: [$(up)] first pass md5 $first"
second=$(md5sum < /tmp/pattern)
echo "pager-touch: [$(up)] second pass md5 $second"
[ "$first" = "$second" ] || fail "pattern changed while paged: $first != $second"
echo "pager-touch: ok"
