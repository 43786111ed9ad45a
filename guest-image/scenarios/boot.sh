# Boot check: the guest sees the CPU count and memory size it was given.
# Parameters: expect_cpus=N expect_mem_mib=M
. /lib/guest/lib.sh
cpus=$(require_param expect_cpus) || exit 1
mem_mib=$(require_param expect_mem_mib) || exit 1

n=$(nproc)
echo "boot: nproc=$n online=$(cat /sys/devices/system/cpu/online) expected=$cpus"
[ "$n" -eq "$cpus" ] || fail "nproc is $n, expected $cpus"

total_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
lo=$((mem_mib * 1024 * 80 / 100))
hi=$((mem_mib * 1024))
echo "boot: MemTotal=${total_kib} kB expected ${lo}..${hi} kB (${mem_mib} MiB)"
[ "$total_kib" -ge "$lo" ] && [ "$total_kib" -le "$hi" ] ||
    fail "MemTotal ${total_kib} kB outside ${lo}..${hi} kB"
echo "boot: ok"
