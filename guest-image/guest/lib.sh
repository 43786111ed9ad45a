# Shared helpers for guest init and scenario scripts (POSIX sh / busybox ash).
# Installed in the initramfs as /lib/guest/lib.sh; scenarios source it:
#   . /lib/guest/lib.sh

# param NAME [DEFAULT]: value of NAME=value on the kernel command line
# (CMDLINE_FILE overrides /proc/cmdline, for tests). Prints DEFAULT and
# succeeds when given and NAME is absent; fails otherwise.
param() {
    for kv in $(cat "${CMDLINE_FILE:-/proc/cmdline}"); do
        case "$kv" in
            "$1="*) echo "${kv#*=}"; return 0 ;;
        esac
    done
    if [ $# -ge 2 ]; then
        echo "$2"
        return 0
    fi
    return 1
}

# fail MESSAGE [RC]: print a diagnostic and exit the scenario with RC (1).
fail() {
    echo "FAIL: $1" >&2
    exit "${2:-1}"
}

# require_param NAME: value of NAME, or fail naming the missing parameter.
require_param() {
    param "$1" || fail "kernel command line lacks $1=..."
}

# status_byte RC: the one-byte status for the debug-exit port, 0 on success,
# clamped to 1..255 on failure.
status_byte() {
    if [ "$1" -eq 0 ]; then echo 0
    elif [ "$1" -gt 255 ]; then echo 255
    elif [ "$1" -lt 1 ]; then echo 1
    else echo "$1"
    fi
}

# report_status RC: write the status byte to I/O port 0xf4 (244), the
# VMM's debug-exit port; the VMM exits with that byte as its exit code.
report_status() {
    b=$(status_byte "$1")
    printf "\\$(printf %03o "$b")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
}
