# Deflate-on-OOM: the VMM starts with a balloon of most of guest RAM and
# VIRTIO_BALLOON_F_DEFLATE_ON_OOM. Wait until the balloon has taken it
# (MemFree below free_below_mib; MemTotal stays, as the driver leaves it
# with this feature), then fill fill_mib MiB of tmpfs, more than is free:
# the kernel's OOM path has the driver give pages back instead of killing.
# The filled file must be complete and read back as written.
# Parameters: free_below_mib=N (320) fill_mib=N (400) wait_s=N (300)
. /lib/guest/lib.sh
free_below=$(param free_below_mib 320)
fill_mib=$(param fill_mib 400)
wait_s=$(param wait_s 300)
up() { cut -d' ' -f1 /proc/uptime; }
free_mib() { echo $(($(awk '/^MemFree:/{print $2}' /proc/meminfo) / 1024)); }
[ -d /sys/bus/virtio/drivers/virtio_balloon ] || fail "virtio_balloon is not loaded"
i=0
while [ "$(free_mib)" -ge "$free_below" ]; do
    [ "$i" -lt "$wait_s" ] || fail "the balloon did not inflate (MemFree $(free_mib) MiB)"
    sleep 1
    i=$((i + 1))
done
echo "BALLOON-OOM-INFLATED up=$(up) free_mib=$(free_mib)"
mount -o remount,size=$((fill_mib + 64))m /tmp || fail "cannot grow /tmp"
fill_pattern /tmp/fill "$fill_mib"
echo "BALLOON-OOM-FILLED up=$(up) mib=$fill_mib free_mib=$(free_mib)"
check_pattern /tmp/fill "$fill_mib" "the filled file"
echo "BALLOON-OOM-SURVIVED up=$(up) mib=$fill_mib"
