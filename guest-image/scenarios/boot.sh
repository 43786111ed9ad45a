# Boot check: the guest sees the CPU count and memory size it was given.
# Parameters: expect_cpus=N expect_mem_mib=M [tail_lines=N]
# tail_lines=N ends with N numbered lines written in one burst, so the
# console still holds them when the guest reports its status and exits.
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
tail_lines=$(param tail_lines 0)
i=1
while [ "$i" -le "$tail_lines" ]; do
    echo "boot: tail line $i of $tail_lines ........................................"
    i=$((i + 1))
done
