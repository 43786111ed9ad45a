# A scenario that always fails with status 3: proves failures reach the host.
. /lib/guest/lib.sh
echo "fail: failing on purpose with status 3"
exit 3
