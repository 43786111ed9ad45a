#!/bin/sh
# L1 init written by the nested harness: load kvm_amd and its dependencies,
# check /dev/kvm, run the payload (/l1/run.sh: our VMM, or QEMU, booting the
# L2 guest with its serial on this console), report its exit code, power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /bin/mount ] || /bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
. /lib/guest/lib.sh
echo "L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "$m" || echo "L1-INSMOD-FAIL $m"
done < /etc/modules.order
echo "L1-KERNEL-MAP $(kernel_map)"
if [ -c /dev/kvm ]; then
    echo "L1-KVM-READY nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null) npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
    cd /
    sh /l1/run.sh
    echo "L1-VMM-EXIT=$?"
else
    echo "L1-NO-KVM: /dev/kvm is missing after loading kvm_amd (does the L1 CPU model have svm?)"
    dmesg | grep -i -E 'kvm|svm' | tail -n 10
fi
sync
# Power-off ends QEMU at once: lines still queued in the tty would be lost.
console_drain
poweroff -f
sleep 5
reboot -f
