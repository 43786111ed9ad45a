# USB mass-storage disks plugged at start: each appears as /dev/sdX with the
# right size on the expected port speed; random data written with O_DIRECT
# reads back the same; a read-only disk refuses writes and reads what the
# host put there. Prints USB-GUEST-MD5 <serial> <md5> for the host to check
# and USB-CRC <library>=<crypto driver> for the CRC libraries under sd_mod.
# Parameters:
#   usb_rw=SERIAL:SPEED:MIB[,...]  read-write disks (SPEED 480 or 5000)
#   usb_ro=SERIAL:SPEED:MIB[,...]  read-only disks with data at their head
#   usb_off_mib=N usb_len_mib=N    the range written (default 1 and 8)
#   usb_wait=SECONDS               bound on each disk's appearance (60)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
off=$(param usb_off_mib 1)
len=$(param usb_len_mib 8)
wait_s=$(param usb_wait 60)

# check_disk SERIAL:SPEED:MIB RO: finds the disk, checks size, speed and
# the read-only flag; prints its sdX.
check_disk() {
    IFS=: read -r serial speed mib <<SPEC
$1
SPEC
    d=$(usb_wait_dev "$serial" "$wait_s") ||
        fail "disk $serial did not appear within ${wait_s}s (blocks: $(ls /sys/block | tr '\n' ' '))"
    sectors=$(cat "/sys/block/$d/size")
    sp=$(usb_speed "$d")
    ro=$(cat "/sys/block/$d/ro")
    echo "USB-DISK serial=$serial dev=$d speed=$sp sectors=$sectors ro=$ro" >&2
    [ "$sectors" -eq $((mib * 2048)) ] ||
        fail "disk $serial ($d) has $sectors sectors, expected $((mib * 2048))"
    [ "$sp" = "$speed" ] || fail "disk $serial ($d) runs at $sp Mb/s, expected $speed"
    [ "$ro" = "$2" ] || fail "disk $serial ($d) has ro=$ro, expected $2"
    echo "$d"
}

for spec in $(param usb_rw "" | tr ',' ' '); do
    d=$(check_disk "$spec" 0) || exit 1
    serial=${spec%%:*}
    usb_write_check "$d" "$off" "$len" "$serial" || fail "disk $serial: data check failed"
    echo "USB-GUEST-MD5 $serial $(md5sum < "/tmp/pat.$serial" | cut -d' ' -f1)"
done

for spec in $(param usb_ro "" | tr ',' ' '); do
    d=$(check_disk "$spec" 1) || exit 1
    serial=${spec%%:*}
    if dd if=/dev/zero of="/dev/$d" bs=4k count=1 oflag=direct 2>/dev/null; then
        fail "a write to read-only disk $serial ($d) succeeded"
    fi
    echo "USB-GUEST-MD5 $serial-head $(usb_md5 "/dev/$d" bs=1M count=1 iflag=direct)"
done
# The crypto drivers sd_mod's CRC libraries (via t10-pi) use: a provider
# loaded before them, or "fallback" when their runtime request for one
# failed (no modprobe here).
echo "USB-CRC crc_t10dif=$(cat /sys/module/crc_t10dif/parameters/transform) crc64_rocksoft=$(cat /sys/module/crc64_rocksoft/parameters/transform)"
# How the controller interrupts (PCI-MSI-X, or IO-APIC with pci=nomsi).
echo "USB-IRQ $(grep xhci /proc/interrupts | tr -s ' ')" >&2
echo "usb-disks: ok"
