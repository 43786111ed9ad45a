# USB runtime-PM benchmark (not a test): the guest-visible resume latency
# of a USB disk with autosuspend on. Each cycle waits until the disk has
# autosuspended (and the controller too, if it may suspend), then times
# one 4 KiB O_DIRECT read with fio (its total latency includes the
# runtime resume the read triggers) and prints
# "PM-RESUME n=N us=LATENCY". Optionally under memory pressure (a
# background loop re-reading a tmpfs file larger than the VMM's resident
# limit, at nice 19: it keeps the host pager evicting and swapping in,
# while the guest's one CPU still runs the resume path first; at nice 0 it
# took half the guest CPU from every resume, which measured the guest's
# scheduler rather than the device). Then an idle stretch: "PM-IDLE controller_suspended_ms=X of=Y" from
# the xHCI PCI function's runtime_suspended_time. Between the two, pmb_resets
# bus resets (`sg_reset -b`: usb-storage's port reset path) timed between
# two /dev/kmsg markers: "PM-RESET n=N us=DURATION".
# Parameters: pmb_serial (bench), pmb_cycles (100), pmb_delay_ms (300),
# pmb_pressure_mib (0: none), pmb_resets (20), pmb_idle_s (60), pmb_wait (60),
# pmb_controller (auto: the xHCI PCI function may runtime-suspend; on: kept
# in D0, so only the link suspends, as with QEMU's qemu-xhci).
. /lib/guest/lib.sh
. /lib/guest/usb.sh
usb_quiet
FIO=/usr/local/bin/fio
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
s=$(param pmb_serial bench)
cycles=$(param pmb_cycles 100)
delay=$(param pmb_delay_ms 300)
pressure=$(param pmb_pressure_mib 0)
idle=$(param pmb_idle_s 60)
resets=$(param pmb_resets 20)
controller=$(param pmb_controller auto)
# pmb_trace_ms > 0: a cycle slower than that prints the kernel's runtime-PM
# trace events of its read ("PM-TRACE n=N <event>": which device resumed
# when), to see where a slow resume spent its time.
trace_ms=$(param pmb_trace_ms 0)
T=/sys/kernel/tracing
wait_s=$(param pmb_wait 60)
[ -x $FIO ] || fail "fio missing at $FIO"


d=$(usb_wait_dev "$s" "$wait_s") || fail "disk $s did not appear"
udev=$(usb_dev_dir "$d")
pci=$(dirname "$(readlink -f /sys/bus/usb/devices/usb1)")
usb_roothubs_eager
msg=$(usb_autosuspend_on "$d" "$delay") || fail "$msg"
echo "$controller" > "$pci/power/control" || fail "cannot set $pci/power/control to $controller"
pid=
if [ "$pressure" -gt 0 ]; then
    mount -o remount,size=$((pressure + 32))m /tmp || fail "cannot grow /tmp"
    dd if=/dev/urandom of=/tmp/pressure bs=1M count="$pressure" 2>/dev/null || fail "no pressure file"
    # Started once reniced, so that every pass runs at nice 19.
    ( while [ ! -e /tmp/pressure.go ]; do sleep 0.1; done
      while :; do md5sum < /tmp/pressure > /dev/null; done ) &
    pid=$!
    renice -n 19 -p "$pid" >/dev/null || fail "cannot renice the pressure loop"
    touch /tmp/pressure.go
fi
if [ "$trace_ms" -gt 0 ]; then
    [ -d $T/events ] || mount -t tracefs nodev $T || fail "cannot mount tracefs"
    echo 1 > $T/events/rpm/enable || fail "no rpm trace events"
fi
echo "PM-BENCH-START dev=$d pressure_mib=$pressure delay_ms=$delay"
n=1
ctl_sleeps=$([ "$controller" = auto ] && echo maybe || echo no)
sectors=$(cat "/sys/block/$d/size")
while [ "$n" -le "$cycles" ]; do
    usb_wait_file_is "$udev/power/runtime_status" suspended "$wait_s" ||
        fail "cycle $n: $udev did not autosuspend"
    # With the controller allowed to suspend, every cycle starts from the
    # whole chain asleep (a read racing the controller's own suspend would
    # time a link resume instead). A controller without PCI PM (QEMU's)
    # never suspends: seen once in the first cycle, then not waited for.
    if [ "$ctl_sleeps" != no ]; then
        if usb_wait_file_is "$pci/power/runtime_status" suspended \
            "$([ "$ctl_sleeps" = yes ] && echo "$wait_s" || echo 5)"; then
            ctl_sleeps=yes
        elif [ "$ctl_sleeps" = yes ]; then
            fail "cycle $n: the controller did not runtime-suspend"
        else
            ctl_sleeps=no
            echo "PM-CONTROLLER stays active: cycles wait for the disk only"
        fi
    fi
    off=$(((n * 2654435761) % (sectors / 8) * 4096))
    [ "$trace_ms" -gt 0 ] && echo > $T/trace
    $FIO --name=resume --filename="/dev/$d" --rw=read --bs=4k --offset="$off" --size=4k \
        --ioengine=psync --direct=1 --output-format=terse --terse-version=3 \
        >/tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err; fail "fio failed in cycle $n"; }
    # Terse v3 field 40: mean total read latency (us); one I/O.
    us=$(awk -F';' '$1 == 3 { printf "%d", $40 }' /tmp/fio.out)
    [ -n "$us" ] || { cat /tmp/fio.out; fail "no latency in cycle $n"; }
    echo "PM-RESUME n=$n us=$us"
    if [ "$trace_ms" -gt 0 ] && [ "$us" -gt $((trace_ms * 1000)) ]; then
        grep -v '^#' $T/trace | sed "s/^ */PM-TRACE n=$n /"
    fi
    n=$((n + 1))
done
sg=$(ls "/sys/block/$d/device/scsi_generic" 2>/dev/null)
# With tracing, a reset slower than pmb_trace_ms prints its kernel log and
# the scheduler's switches and wake-ups ("PM-TRACE n=rN ..."): which task
# waited for the CPU, and when, inside the reset.
if [ "$trace_ms" -gt 0 ]; then
    for e in sched/sched_switch sched/sched_wakeup; do
        echo 1 > "$T/events/$e/enable" || fail "no $e trace event"
    done
fi
n=1
while [ "$n" -le "$resets" ]; do
    [ -c "/dev/$sg" ] || fail "no sg device for $d ($sg)"
    dd if="/dev/$d" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
    [ "$trace_ms" -gt 0 ] && echo > $T/trace
    echo "PMB-RESET-START n=$n" > /dev/kmsg
    sg_reset -b "/dev/$sg" || fail "sg_reset -b failed in reset $n"
    echo "PMB-RESET-END n=$n" > /dev/kmsg
    # dmesg stamps are [seconds.micros]: the difference in us.
    us=$(dmesg | awk -v n="$n" '
        { line = $0; sub(/^\[ */, "", line); split(line, f, /[] ]+/) }
        f[2] == "PMB-RESET-START" && f[3] == "n=" n { t0 = f[1] }
        f[2] == "PMB-RESET-END" && f[3] == "n=" n { printf "%d", (f[1] - t0) * 1000000 }')
    echo "PM-RESET n=$n us=$us"
    if [ "$trace_ms" -gt 0 ] && [ "${us:-0}" -gt $((trace_ms * 1000)) ]; then
        dmesg | sed -n "/PMB-RESET-START n=$n\$/,/PMB-RESET-END n=$n\$/p" | sed "s/^/PM-TRACE n=r$n /"
        grep -v '^#' $T/trace | sed "s/^ */PM-TRACE n=r$n /"
    fi
    n=$((n + 1))
done
[ -n "$pid" ] && kill "$pid"
before=$(cat "$pci/power/runtime_suspended_time")
sleep "$idle"
after=$(cat "$pci/power/runtime_suspended_time")
echo "PM-IDLE controller_suspended_ms=$((after - before)) of=$((idle * 1000)) status=$(cat "$pci/power/runtime_status")"
echo "PM-BENCH-DONE"
