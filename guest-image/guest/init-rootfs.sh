#!/bin/sh
# initramfs /init for the Debian root disk (guest-image rootfs): load the
# virtio and ext4 modules, wait for the root device, report its e2fsck -n
# verdict, mount it read-only (systemd-remount-fs makes it read-write per
# /etc/fstab) and switch_root to systemd. On failure: report a status byte
# through the debug-exit port and reset, so the VMM exits non-zero.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /bin/mount ] || /bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
. /lib/guest/lib.sh
echo "ROOTFS-INITRAMFS uptime=$(cut -d' ' -f1 /proc/uptime)"

die() {
    echo "ROOTFS-INITRAMFS-FAIL $1"
    report_status "${2:-1}"
    reboot -f
    while :; do sleep 60; done
}

while read -r m; do
    [ -n "$m" ] || continue
    insmod "$m" || echo "ROOTFS-INSMOD-FAIL $m"
done < /etc/modules.order

root=$(param root /dev/vda)
# The disk appears asynchronously after virtio_blk probes: wait up to 10 s.
i=0
while [ ! -b "$root" ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ -b "$root" ] || die "root device $root did not appear" 2

# e2fsck -n opens read-only and changes nothing; "clean" means the last
# unmount was clean (no journal to replay, no error flag).
if [ "$(param rootfsck 1)" = 1 ]; then
    e2fsck -n "$root" >/tmp/fsck.log 2>&1
    rc=$?
    if [ "$rc" -eq 0 ] && grep -q ': clean,' /tmp/fsck.log; then
        echo "ROOTFS-FSCK clean rc=$rc"
    else
        echo "ROOTFS-FSCK not-clean rc=$rc"
        cat /tmp/fsck.log
    fi
fi

mount -t ext4 -o ro "$root" /newroot || die "cannot mount $root" 3
[ -L /newroot/sbin/init ] || [ -x /newroot/sbin/init ] || die "no /sbin/init on $root" 4
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/init
