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

fio_job "vda" randread-4k-qd32 randread 4k 32
fio_job "vda" read-1m-qd8 read 1M 8
fio_job "vda" write-1m-qd8 write 1M 8
echo "FIO-DONE"
