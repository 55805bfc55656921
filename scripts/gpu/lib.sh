# lib.sh - sourced by the scripts of one device call (decode_check.sh,
# sweep.sh, validate.sh):
#   dev_clock DEFAULT   the call's clock: BUDGET seconds (else DEFAULT);
#                       left (seconds to go) and el (a line stamped with
#                       the seconds gone)
#   kb_unpack TAR       kiln's packed binaries (scripts/gpu/pack.sh) into
#                       /tmp/kb, fresh, on LD_LIBRARY_PATH; NVLink SHARP
#                       off for NCCL (the machine's own libnccl.so.2)
dev_clock() {
    budget=${BUDGET:-$1}
    t0=$(date +%s)
}
left() { echo $((budget - ($(date +%s) - t0))); }
el() { echo "[$(($(date +%s) - t0)) s] $*"; }
kb_unpack() {
    kb=/tmp/kb
    rm -rf "$kb" && mkdir -p "$kb"
    python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$1" "$kb"
    export LD_LIBRARY_PATH=$kb/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export NCCL_NVLS_ENABLE=0
}
