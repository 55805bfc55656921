# lib.sh - sourced by the scripts of one device call (decode_check.sh,
# sweep.sh, validate.sh):
#   dev_begin DEFAULT TAR OUT
#                       what each of them starts with: dev_clock DEFAULT,
#                       work (KILN_WORK, else /tmp/kiln-bench) and OUT made,
#                       kb_unpack TAR
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
dev_begin() {
    dev_clock "$1"
    work=${KILN_WORK:-/tmp/kiln-bench}
    mkdir -p "$3" "$work"
    kb_unpack "$2"
}
kb_unpack() {
    kb=/tmp/kb
    rm -rf "$kb" && mkdir -p "$kb"
    python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$1" "$kb"
    export LD_LIBRARY_PATH=$kb/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export NCCL_NVLS_ENABLE=0
}
