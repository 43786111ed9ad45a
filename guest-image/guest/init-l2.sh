#!/bin/sh
# Guest (L2) init written by guest-image: mount, load modules, run the
# scenario, report SCENARIO-PASS / SCENARIO-FAIL rc=N on the console and
# through the debug-exit port, then reboot (reboot=k: keyboard controller).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /bin/mount ] || /bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
. /lib/guest/lib.sh
echo "GUEST-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "$m" || echo "GUEST-INSMOD-FAIL $m"
done < /etc/modules.order
echo "GUEST-KERNEL-MAP $(kernel_map)"
cd /
# A scenario that hangs would leave the test that runs it with nothing but
# a timeout: watchdog=SECONDS (set by the harness inside its own bound)
# prints the kernel's view of the hang while the scenario runs on.
# Only the watchdog's sleep is stopped at the end: a report under way
# finishes before the verdict and the status go out.
watchdog_s=$(param watchdog 0)
watchdog_pid=
if [ "$watchdog_s" -gt 0 ] 2>/dev/null; then
    (
        sleep "$watchdog_s" &
        echo $! > /tmp/watchdog.pid
        wait $! && hang_report "$watchdog_s"
    ) &
    watchdog_pid=$!
fi
sh /scenario.sh
rc=$?
if [ -n "$watchdog_pid" ]; then
    i=0
    while [ ! -f /tmp/watchdog.pid ] && [ "$i" -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    kill "$(cat /tmp/watchdog.pid 2>/dev/null)" 2>/dev/null
    wait "$watchdog_pid"
fi
if [ "$rc" -eq 0 ]; then
    echo "SCENARIO-PASS"
else
    echo "SCENARIO-FAIL rc=$rc"
    echo "--- diagnostics: cmdline: $(cat /proc/cmdline)"
    echo "--- dmesg (last 20 lines):"
    dmesg | tail -n 20
fi
sync
report_status "$rc"
# Still running: the VMM has no debug-exit port; stop through a reset.
reboot -f
sleep 5
echo "GUEST-REBOOT-FAILED"
poweroff -f
while :; do sleep 60; done
