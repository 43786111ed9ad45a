# Crash consistency, the guest's half (integration/tests/crash.rs). Two
# disks: a virtio-blk disk (/dev/vda) and a USB mass-storage disk found by
# its serial. Both must offer a write cache (so fsync sends FLUSH and
# SYNCHRONIZE CACHE).
#   mode=write   writes block 0, 1, ... of each disk in turn, each one 4 KiB
#                of random data with O_DIRECT and then fsync; once fsync has
#                returned, prints "CRASH-ACK <disk> <block> <md5>". The host
#                kills the VMM with SIGKILL while this runs.
#   mode=verify  (after a restart on the same images) prints
#                "CRASH-READ <disk> <block> <md5>" for every block of both.
# Parameters: mode, blocks (per disk), usb_serial.
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
mode=$(require_param mode) || exit 1
blocks=$(require_param blocks) || exit 1
serial=$(require_param usb_serial) || exit 1

[ -b /dev/vda ] || fail "no /dev/vda; block devices: $(ls /sys/block)"
sd=$(usb_wait_dev "$serial" 60) || fail "USB disk $serial did not appear"

# flushes DISK: completed flush requests (field 16 of /sys/block/DISK/stat).
flushes() { awk '{ print $16 }' "/sys/block/$1/stat"; }

case "$mode" in
write)
    for d in vda "$sd"; do
        wc=$(cat "/sys/block/$d/queue/write_cache")
        echo "crash: $d write_cache=$wc"
        [ "$wc" = "write back" ] || fail "$d does not offer a write cache ($wc)"
    done
    f0_vda=$(flushes vda)
    f0_sd=$(flushes "$sd")
    i=0
    while [ "$i" -lt "$blocks" ]; do
        for d in vda "$sd"; do
            head -c 4096 /dev/urandom > /tmp/block
            dd if=/tmp/block of="/dev/$d" bs=4096 seek="$i" count=1 \
                oflag=direct conv=fsync 2>/dev/null || fail "writing block $i of $d"
            # The disk's name in the host's terms, not the guest's sdX.
            name=$d
            [ "$d" = vda ] || name=usb
            echo "CRASH-ACK $name $i $(md5sum < /tmp/block | cut -d' ' -f1)"
        done
        i=$((i + 1))
        # One report of the flushes the first blocks sent, then none.
        if [ "$i" -eq 2 ]; then
            echo "crash: flushes vda $f0_vda -> $(flushes vda), $sd $f0_sd -> $(flushes "$sd")"
            [ "$(flushes vda)" -gt "$f0_vda" ] || fail "fsync sent no FLUSH to vda"
            [ "$(flushes "$sd")" -gt "$f0_sd" ] || fail "fsync sent no SYNCHRONIZE CACHE to $sd"
        fi
    done
    echo "crash: all $blocks blocks written"
    ;;
verify)
    for d in vda "$sd"; do
        name=$d
        [ "$d" = vda ] || name=usb
        i=0
        while [ "$i" -lt "$blocks" ]; do
            m=$(dd if="/dev/$d" bs=4096 skip="$i" count=1 iflag=direct 2>/dev/null |
                md5sum | cut -d' ' -f1)
            echo "CRASH-READ $name $i $m"
            i=$((i + 1))
        done
    done
    ;;
*)
    fail "mode must be write or verify, not $mode"
    ;;
esac
