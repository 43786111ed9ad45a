# Disk benchmark (not a test): fio on /dev/vda, O_DIRECT, libaio, one job
# each: 4 KiB random read at iodepth 32, 1 MiB sequential read and write at
# iodepth 8. Prints "FIO-RESULT job=<name> iops=<n> bw_kib=<n>" per job,
# then FIO-DONE. Parameters: fio_runtime (s, default 10), fio_size_mib
# (the region of the disk used, default 128). Needs fio at $FIO.
. /lib/guest/lib.sh
FIO=/usr/local/bin/fio
runtime=$(param fio_runtime 10)
size=$(param fio_size_mib 128)

[ -b /dev/vda ] || fail "no /dev/vda; block devices: $(ls /sys/block)"
[ -x $FIO ] || fail "fio missing at $FIO"
echo "blk-bench: vda $(blockdev --getsize64 /dev/vda) bytes, queues=$(ls /sys/block/vda/mq | wc -l), write_cache=$(cat /sys/block/vda/queue/write_cache)"

# run_job NAME RW BS IODEPTH
run_job() {
    $FIO --name="$1" --filename=/dev/vda --rw="$2" --bs="$3" --iodepth="$4" \
        --ioengine=libaio --direct=1 --numjobs=1 --size="${size}M" \
        --runtime="$runtime" --ramp_time=1 --time_based \
        --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err ||
        { cat /tmp/fio.err; fail "fio $1 failed"; }
    # Terse v3: field 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
    awk -F';' -v job="$1" -v rw="$2" '$1 == 3 {
        if (rw ~ /write/) { bw = $48; iops = $49 } else { bw = $7; iops = $8 }
        print "FIO-RESULT job=" job " iops=" iops " bw_kib=" bw
    }' /tmp/fio.out
    grep -q '^3;' /tmp/fio.out || { cat /tmp/fio.out /tmp/fio.err; fail "fio $1 printed no result"; }
}

run_job randread-4k-qd32 randread 4k 32
run_job read-1m-qd8 read 1M 8
run_job write-1m-qd8 write 1M 8
echo "FIO-DONE"
