# USB runtime power management as a distribution with autosuspend on
# drives it (TLP / powertop style: power/control=auto with a short delay on
# the USB device and on its SCSI disk). Four phases in one boot:
#
#  link:  the controller kept in D0; the disk autosuspends (port U3) and
#         O_DIRECT I/O resumes it, pm_link_cycles times, checksummed I/O in
#         every cycle.
#  d3:    power/control=auto on the xHCI PCI function too: with the disk and
#         both root hubs suspended the controller reaches D3hot; I/O brings
#         it back, pm_d3_cycles times.
#  wake:  a host-side remote wake (L1 runs usb.wake) brings the controller
#         and the device back by themselves, pm_wake_cycles times.
#  hotplug: the L1 script hot-detaches the disk while the controller is in
#         D3hot (the disk must go away), the controller with no device
#         reaches D3hot again, L1 hot-attaches a disk (it must appear and
#         work), pm_attach_cycles times.
#
# Every "look" (USB-PM-LOOK tag;) holds still for pm_look_s seconds so the
# L1 script can record vm.info in that state (L1-PM-INFO tag ...). At the end
# the guest's kernel log must hold no sign of a controller that failed to
# resume ("xHC error in resume", "HC died", "not responding", "Reinit").
# Parameters:
#   pm_serial=ID       the disk plugged at start (pm)
#   pm_hot_serial=ID   the disk L1 attaches in the idle phase (pm2)
#   pm_link_cycles=N   (100)   pm_d3_cycles=N (20)
#   pm_wake_cycles=N   (20)    pm_attach_cycles=N (20)
#   pm_delay_ms=MS     autosuspend delay of the device and the disk (500)
#   pm_wait=SECONDS    bound on each wait (60)
#   pm_look_s=SECONDS  how long each look holds still (3)
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
s=$(param pm_serial pm)
hot=$(param pm_hot_serial pm2)
link_cycles=$(param pm_link_cycles 100)
d3_cycles=$(param pm_d3_cycles 20)
wake_cycles=$(param pm_wake_cycles 20)
attach_cycles=$(param pm_attach_cycles 20)
delay=$(param pm_delay_ms 500)
wait_s=$(param pm_wait 60)
look_s=$(param pm_look_s 3)


# look TAG: asks L1 to record vm.info now and holds still meanwhile.
look() {
    echo "USB-PM-LOOK $1;"
    sleep "$look_s"
}


# checked_io SDX N TAG: 1 MiB written at MiB N (O_DIRECT), read back, compared.
checked_io() {
    usb_write_check "$1" "$2" 1 "$3" || fail "$3: data check on $1 failed"
}

d=$(usb_wait_dev "$s" "$wait_s") || fail "disk $s did not appear"
udev=$(usb_dev_dir "$d")
pci=$(dirname "$(readlink -f /sys/bus/usb/devices/usb1)")
[ -e "$pci/power/control" ] || fail "no PCI function above usb1 ($pci)"
echo on > "$pci/power/control"
echo "USB-PM-SETUP dev=$d usb=${udev##*/} pci=${pci##*/} delay_ms=$delay"
usb_roothubs_eager
msg=$(usb_autosuspend_on "$d" "$delay") || fail "$msg"

# --- link: port U3 / U0 with the controller in D0.
n=1
while [ "$n" -le "$link_cycles" ]; do
    usb_wait_file_is "$udev/power/runtime_status" suspended "$wait_s" ||
        fail "link cycle $n: $udev did not autosuspend ($(cat "$udev/power/runtime_status"))"
    [ "$n" -eq 1 ] && look link-suspended
    checked_io "$d" $((n % 32 + 1)) "link$n"
    n=$((n + 1))
done
echo "USB-PM-LINK cycles=$link_cycles io=ok"

# --- d3: the controller runtime-suspends to D3hot once everything sleeps.
echo auto > "$pci/power/control"
n=1
while [ "$n" -le "$d3_cycles" ]; do
    usb_wait_file_is "$pci/power/runtime_status" suspended "$wait_s" ||
        fail "d3 cycle $n: controller did not runtime-suspend ($(cat "$pci/power/runtime_status"))"
    if [ "$n" -eq 1 ]; then
        echo "USB-PM-D3 power_state=$(cat "$pci/power_state" 2>/dev/null || echo unknown)"
        look d3-suspended
    fi
    checked_io "$d" $((n % 32 + 1)) "d3-$n"
    n=$((n + 1))
done
echo "USB-PM-D3-CYCLES cycles=$d3_cycles io=ok"

# --- wake: asleep again, L1 asks the device to wake the bus (usb.wake);
# the device and the controller must come back by themselves.
n=1
while [ "$n" -le "$wake_cycles" ]; do
    usb_wait_file_is "$pci/power/runtime_status" suspended "$wait_s" ||
        fail "wake cycle $n: controller awake before the remote wake"
    echo "USB-PM-WAKE-WANT n=$n;"
    usb_wait_file_is "$udev/power/runtime_status" active "$wait_s" ||
        fail "wake cycle $n: the device did not wake after the host's remote wake"
    n=$((n + 1))
done
checked_io "$d" 40 wake
echo "USB-PM-WAKES n=$wake_cycles io=ok"

# --- hotplug behind a D3hot controller: L1 detaches the disk while the
# controller sleeps (the disk must go), the idle controller sleeps again,
# L1 attaches a disk (it must appear and work), pm_attach_cycles times.
n=1
dev=$d
while [ "$n" -le "$attach_cycles" ]; do
    usb_wait_file_is "$pci/power/runtime_status" suspended "$wait_s" ||
        fail "attach cycle $n: controller awake before the detach"
    echo "USB-PM-DETACH-WANT n=$n;"
    usb_wait_gone "$dev" "$wait_s" || fail "attach cycle $n: $dev still there after the detach"
    usb_wait_file_is "$pci/power/runtime_status" suspended "$wait_s" ||
        fail "attach cycle $n: idle controller did not runtime-suspend"
    [ "$n" -eq 1 ] && look idle-suspended
    echo "USB-PM-ATTACH-WANT n=$n;"
    dev=$(usb_wait_dev "$hot" "$wait_s") ||
        fail "attach cycle $n: disk $hot did not appear after attach to a sleeping controller"
    msg=$(usb_autosuspend_on "$dev" "$delay") || fail "$msg"
    checked_io "$dev" $((n % 8 + 1)) "attach$n"
    n=$((n + 1))
done
echo "USB-PM-ATTACH-CYCLES n=$attach_cycles io=ok"

bad=$(dmesg | grep -c -E "xHC error in resume|HC died|not responding|Reinit|restore state timeout|save state timeout")
dmesg | grep -i -E "xhci|usb [0-9]" | tail -n 15
echo "USB-PM-DMESG bad=$bad"
[ "$bad" -eq 0 ] || fail "the guest logged $bad controller failures (see dmesg above)"
echo "usb-pm: ok"
