# virtio-blk data path on one disk: size, serial, one queue per vCPU, FLUSH
# advertised and used, a random pattern written with O_DIRECT reads back
# after dropping caches (direct and buffered), DISCARD and WRITE_ZEROES
# read back as zeroes and leave the pattern alone. Prints
# "BLK-GUEST-MD5 pattern <md5>" for the host to compare with the image file.
# Parameters (sizes in MiB, offsets in MiB from the start of the disk):
#   blk_bytes blk_serial blk_queues pat_off pat_mib disc_off disc_mib
#   wz_off wz_mib
# Needs util-linux blkdiscard (BLKZEROOUT with -z) at $ZEROOUT.
. /lib/guest/lib.sh
ZEROOUT=/usr/local/sbin/blkdiscard

bytes=$(require_param blk_bytes) || exit 1
serial=$(require_param blk_serial) || exit 1
queues=$(require_param blk_queues) || exit 1
pat_off=$(require_param pat_off) || exit 1
pat_mib=$(require_param pat_mib) || exit 1
disc_off=$(require_param disc_off) || exit 1
disc_mib=$(require_param disc_mib) || exit 1
wz_off=$(require_param wz_off) || exit 1
wz_mib=$(require_param wz_mib) || exit 1

dev=/dev/vda
q=/sys/block/vda/queue

# stat_field N: field N (1-based) of /sys/block/vda/stat.
stat_field() { awk -v n="$1" '{ print $n }' /sys/block/vda/stat; }

[ -b $dev ] || fail "no $dev; block devices: $(ls /sys/block)"
got=$(blockdev --getsize64 $dev)
sectors=$(cat /sys/block/vda/size)
echo "blk: vda size=$got sectors=$sectors expected=$bytes"
[ "$got" = "$bytes" ] || fail "vda is $got bytes, expected $bytes"
[ $((sectors * 512)) -eq "$bytes" ] || fail "vda has $sectors sectors"

s=$(cat /sys/block/vda/serial 2>/dev/null)
echo "blk: serial=$s expected=$serial"
[ "$s" = "$serial" ] || fail "serial is '$s', expected '$serial'"

nq=$(ls /sys/block/vda/mq | wc -l)
echo "blk: hardware queues=$nq expected=$queues"
[ "$nq" -eq "$queues" ] || fail "$nq queues, expected $queues"

wc_mode=$(cat $q/write_cache)
echo "blk: write_cache=$wc_mode ro=$(cat /sys/block/vda/ro)"
[ "$wc_mode" = "write back" ] || fail "write_cache is '$wc_mode': FLUSH not offered"
[ "$(cat /sys/block/vda/ro)" = 0 ] || fail "vda is read-only"

# --- random pattern, O_DIRECT, read back after dropping caches ---
flushes0=$(stat_field 16)
put_random $dev "$pat_off" "$pat_mib" /tmp/pat
want=$(md5_of /tmp/pat)
drop_caches
direct=$(md5_range $dev "$pat_off" "$pat_mib")
buffered=$(md5_range $dev "$pat_off" "$pat_mib" buffered)
echo "blk: pattern $pat_mib MiB at $pat_off MiB: wrote $want read direct $direct buffered $buffered"
[ "$direct" = "$want" ] || fail "O_DIRECT read-back differs from the pattern"
[ "$buffered" = "$want" ] || fail "buffered read-back differs from the pattern"
flushes1=$(stat_field 16)
echo "blk: flush requests $flushes0 -> $flushes1"
[ "$flushes1" -gt "$flushes0" ] || fail "fsync sent no FLUSH to the device"

zero_disc=$(md5_range /dev/zero 0 "$disc_mib" buffered)
zero_wz=$(md5_range /dev/zero 0 "$wz_mib" buffered)

# --- DISCARD ---
dmax=$(cat $q/discard_max_bytes)
echo "blk: discard_max_bytes=$dmax discard_granularity=$(cat $q/discard_granularity)"
[ "$dmax" -gt 0 ] || fail "the disk offers no discard"
put_random $dev "$disc_off" "$disc_mib" /tmp/disc
[ "$(md5_range $dev "$disc_off" "$disc_mib")" = "$(md5_of /tmp/disc)" ] ||
    fail "data before discard did not land"
d_ios0=$(stat_field 12)
d_sec0=$(stat_field 14)
blkdiscard -o $((disc_off << 20)) -l $((disc_mib << 20)) $dev || fail "blkdiscard failed"
d_ios1=$(stat_field 12)
d_sec1=$(stat_field 14)
drop_caches
got=$(md5_range $dev "$disc_off" "$disc_mib")
echo "blk: discard $disc_mib MiB at $disc_off MiB: requests $d_ios0->$d_ios1 sectors $d_sec0->$d_sec1 md5 $got zeroes $zero_disc"
[ $((d_sec1 - d_sec0)) -eq $((disc_mib * 2048)) ] || fail "discard sectors counted $((d_sec1 - d_sec0))"
[ "$got" = "$zero_disc" ] || fail "discarded range does not read back as zeroes"

# --- WRITE_ZEROES (BLKZEROOUT; the kernel sends REQ_OP_WRITE_ZEROES when
# write_zeroes_max_bytes > 0 and falls back to writing zero pages if not) ---
[ -x $ZEROOUT ] || fail "util-linux blkdiscard missing at $ZEROOUT"
wmax=$(cat $q/write_zeroes_max_bytes)
echo "blk: write_zeroes_max_bytes=$wmax"
[ "$wmax" -gt 0 ] || fail "the disk offers no WRITE_ZEROES"
put_random $dev "$wz_off" "$wz_mib" /tmp/wz
[ "$(md5_range $dev "$wz_off" "$wz_mib")" = "$(md5_of /tmp/wz)" ] ||
    fail "data before write-zeroes did not land"
$ZEROOUT -z -o $((wz_off << 20)) -l $((wz_mib << 20)) $dev || fail "blkdiscard -z failed"
drop_caches
got=$(md5_range $dev "$wz_off" "$wz_mib")
wmax2=$(cat $q/write_zeroes_max_bytes)
echo "blk: write-zeroes $wz_mib MiB at $wz_off MiB: md5 $got zeroes $zero_wz; write_zeroes_max_bytes after=$wmax2"
[ "$got" = "$zero_wz" ] || fail "write-zeroed range does not read back as zeroes"
# The block layer turns WRITE_ZEROES off when the device rejects it.
[ "$wmax2" -gt 0 ] || fail "WRITE_ZEROES was disabled after use (device error?)"

# --- neighbours intact, no I/O errors ---
drop_caches
again=$(md5_range $dev "$pat_off" "$pat_mib")
[ "$again" = "$want" ] || fail "pattern changed after discard/write-zeroes"
if dmesg | grep -E 'I/O error|blk_update_request|critical (target|medium)'; then
    fail "the kernel logged block I/O errors"
fi
echo "BLK-GUEST-MD5 pattern $want"
echo "blk-data: ok"
