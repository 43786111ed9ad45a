# USB disk benchmark (not a test): fio on the USB disk with serial
# bench_serial, O_DIRECT, libaio, one job each: 4 KiB random read, 1 MiB
# sequential read, 1 MiB sequential write. Bulk-Only Transport carries one
# command at a time (usb-storage's can_queue is 1), so deeper queues only
# wait in the block layer; the job names keep the blk-bench format so the
# same parser reads both. Prints "FIO-RESULT job=<name> iops=<n>
# bw_kib=<n>" per job, then FIO-DONE.
# Parameters: bench_serial (bench), fio_runtime (s, 10), fio_size_mib (the
# region of the disk used, 128). Needs fio at /usr/local/bin/fio.
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
FIO=/usr/local/bin/fio
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
serial=$(param bench_serial bench)
runtime=$(param fio_runtime 10)
size=$(param fio_size_mib 128)
[ -x $FIO ] || fail "fio missing at $FIO"
d=$(usb_wait_dev "$serial" 120) || fail "USB disk $serial did not appear"
echo "usb-bench: $d speed=$(usb_speed "$d") sectors=$(cat "/sys/block/$d/size") max_sectors_kb=$(cat "/sys/block/$d/queue/max_sectors_kb")"

fio_job "$d" randread-4k-qd32 randread 4k 32
fio_job "$d" read-1m-qd8 read 1M 8
fio_job "$d" write-1m-qd8 write 1M 8
echo "FIO-DONE"
