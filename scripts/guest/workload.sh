# The guest's workload, sourced by /init (and by the tests, to check that the
# shell and tests/guest.py agree on a file's content).  POSIX sh + busybox.
#
# File number N is named f-NNNNNN (6 digits) and holds
#   COUNT = 64 + (N * 37) % 1600   lines, each "<name> qmpbackup guest workload\n"
# (34 bytes: 2 KiB to 56 KiB).  It is fsynced, then its name is appended to
# MANIFEST, which is fsynced, then the directory is.  A name in MANIFEST is
# therefore a file whose whole content reached the disk before it was listed.

workload_line_count() {
    echo $((64 + ($1 * 37) % 1600))
}

# write_one DIR N: write file N into DIR and list it in DIR/MANIFEST.
write_one() {
    name=$(printf 'f-%06d' "$2")
    yes "$name qmpbackup guest workload" | head -n "$(workload_line_count "$2")" >"$1/$name"
    sync "$1/$name"
    echo "$name" >>"$1/MANIFEST"
    sync "$1/MANIFEST"
    sync "$1"
}

# run_workload DIR INTERVAL: write files forever, from the one after the last
# listed in DIR/MANIFEST, until /run/qmpbackup-stop exists.
run_workload() {
    n=0
    if [ -s "$1/MANIFEST" ]; then
        last=$(tail -n 1 "$1/MANIFEST")
        n=$(expr "${last#f-}" + 0)
    fi
    while [ ! -e /run/qmpbackup-stop ]; do
        n=$((n + 1))
        write_one "$1" "$n"
        sleep "$2"
    done
}
