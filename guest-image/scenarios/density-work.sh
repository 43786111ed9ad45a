# Density benchmark workload (scripts/bench.sh density): a working set of
# ws_mib MiB of random data in tmpfs (random, so zram cannot compress it),
# checksummed once as a warm-up; then "ready", and a wait for one line on the
# console, which the L1 script sends to every guest of a set at once, so all
# guests measure over the same stretch of time; then md5sum passes over the
# data until `seconds` have passed since that line. Every pass must give the
# warm-up's checksum (paging must not change the data). The last line gives
# the guest's throughput: MiB checksummed per second from the go line to the
# end of the last pass.
# Parameters: ws_mib=N (default 48), seconds=S (default 60), wait_go=0|1
# (default 1; 0 starts at once, for running the scenario on its own).
. /lib/guest/lib.sh
ws=$(param ws_mib 48)
secs=$(param seconds 60)
up() { cut -d' ' -f1 /proc/uptime; }
mount -o remount,size=$((ws + 16))m /tmp || fail "cannot grow /tmp"
echo "density: [$(up)] writing $ws MiB of random data to tmpfs"
dd if=/dev/urandom of=/tmp/ws bs=1M count="$ws" 2>/dev/null || fail "dd of the working set failed"
ref=$(md5sum < /tmp/ws)
ref=${ref%% *}
echo "density: [$(up)] ready ws_mib=$ws md5=$ref"
if [ "$(param wait_go 1)" = 1 ]; then
    # stdin is the console (ttyS0): the L1 script writes one line to it.
    read -r _go || fail "the console closed before the go line"
fi
t0=$(up)
echo "density: [$t0] go"
end=$(awk -v t="$t0" -v s="$secs" 'BEGIN { print t + s }')
n=0
now=$t0
while awk -v a="$now" -v b="$end" 'BEGIN { exit !(a < b) }'; do
    sum=$(md5sum < /tmp/ws)
    now=$(up)
    n=$((n + 1))
    [ "${sum%% *}" = "$ref" ] || fail "pass $n: checksum ${sum%% *} != $ref (data changed)"
    echo "density: [$now] pass $n"
done
rate=$(awk -v n="$n" -v w="$ws" -v a="$t0" -v b="$now" \
    'BEGIN { if (b > a) printf "%.2f", n * w / (b - a); else print 0 }')
span=$(awk -v a="$t0" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
echo "density: done passes=$n span_s=$span rate_mib_s=$rate"
echo "density: ok"
