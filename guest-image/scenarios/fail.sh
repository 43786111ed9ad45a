# A scenario that always fails with status 3: proves failures reach the host.
# fail_after=SECONDS waits first (to let the init's watchdog report).
. /lib/guest/lib.sh
sleep "$(param fail_after 0)"
echo "fail: failing on purpose with status 3"
exit 3
