# Overcommit check: touch touch_mib MiB of guest memory with a random pattern
# (far more than the VMM's resident limit, so the pager must swap) and verify
# every byte by checksum after it has been paged out and back in.
# Parameters: touch_mib=N (default 700)
. /lib/guest/lib.sh
mib=$(param touch_mib 700)
mount -o remount,size=$((mib + 64))m /tmp || fail "cannot grow /tmp"
echo "pager-touch: writing $mib MiB of random data to tmpfs"
dd if=/dev/urandom of=/tmp/pattern bs=1M count="$mib" 2>/dev/null ||
    fail "dd of the pattern failed"
first=$(md5sum < /tmp/pattern)
echo "pager-touch: first pass md5 $first"
# Touch other memory in between so the pattern's pages go cold and out.
dd if=/dev/zero of=/tmp/filler bs=1M count=64 2>/dev/null
rm -f /tmp/filler
second=$(md5sum < /tmp/pattern)
echo "pager-touch: second pass md5 $second"
[ "$first" = "$second" ] || fail "pattern changed while paged: $first != $second"
echo "pager-touch: ok"
