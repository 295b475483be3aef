# Sourced by the other scripts. On CPU, XLA mallocs each step's temporaries anew and glibc maps
# the large ones fresh, 4 KiB page faults and all: asking for transparent huge pages makes the
# demo's steps 1.2-1.6x faster (docs/PERFORMANCE.md, "The host allocator"; vit_jax/xla_flags.py).
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=1:*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
