# Shared by tests/hil/run.sh and tests/vm/run.sh (sourced): Debian's kernel
# for a QEMU guest, and the modules a busybox /init must insmod itself.
#
#   guest_kernel "$work"          sets kernel, kver, moddir (downloads once)
#   guest_modules "$moddir" m...  prints the modules' paths (relative to
#                                 $moddir), dependencies first

guest_kernel() {
    local work=$1
    # The kernel: Debian's, unpacked (nothing is installed on the host).
    if ! ls "$work"/k/boot/vmlinuz-* >/dev/null 2>&1; then
        local pkg
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
        (cd "$work" && apt-get download "$pkg" && dpkg-deb -x linux-image-*.deb k)
    fi
    kernel=$(ls "$work"/k/boot/vmlinuz-* | head -1)
    kver=$(basename "$(ls -d "$work"/k/lib/modules/*)")
    moddir="$work/k/lib/modules/$kver"
    # The package leaves modules.dep to depmod at install time.
    [ -f "$moddir/modules.dep" ] || depmod -b "$work/k" "$kver"
}

guest_modules() {
    local moddir=$1
    shift
    _order=()
    _add() {
        local rel deps d dn o
        rel=$(awk -F: -v m="$1" '{n=$1; sub(/.*\//,"",n); sub(/\.ko.*/,"",n); gsub(/-/,"_",n); mm=m; gsub(/-/,"_",mm); if (n==mm) {print $1; exit}}' "$moddir/modules.dep")
        [ -n "$rel" ] || return 0
        deps=$(awk -F: -v r="$rel" '$1==r {print $2}' "$moddir/modules.dep")
        for d in $deps; do
            dn=$(basename "$d"); dn=${dn%%.ko*}; _add "$dn"
        done
        for o in "${_order[@]:-}"; do [ "$o" = "$rel" ] && return 0; done
        _order+=("$rel")
    }
    local m
    for m in "$@"; do _add "$m"; done
    printf '%s\n' "${_order[@]}"
}
