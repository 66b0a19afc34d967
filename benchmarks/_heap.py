"""Steady heap behaviour for the benchmarks, so that side-by-side timings compare the kernels rather than the allocator.

glibc serves every allocation above an adaptive threshold (up to 32 MiB) with a fresh `mmap` and returns it on free.
Batch-32 activations are that large, so each one costs page faults, and how many depends on the process's allocation
history: timing noise that differs between variants. `keep_freed_memory` makes glibc keep freed blocks for reuse, as
jemalloc or tcmalloc do. The same effect without code: `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`.
"""
import ctypes, ctypes.util, platform

HEAP_CHOICES = ('keep', 'default')

def keep_freed_memory() -> bool:
    "Tell glibc to keep freed memory (no per-allocation mmap below 1 GiB, no trimming); False where that is not glibc."
    if platform.system() != 'Linux': return False
    try: mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError): return False # e.g. musl: no mallopt
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))

def add_heap_arg(parser):
    parser.add_argument('--heap', default='keep', choices=HEAP_CHOICES,
                        help="'keep': glibc keeps freed memory for reuse (steady timings); 'default': glibc's own policy")

def setup_heap(choice) -> str:
    "Apply `--heap` and return the words the printed table uses for it."
    if choice == 'keep': return 'heap: freed memory kept' if keep_freed_memory() else 'heap: default (not glibc)'
    return 'heap: glibc default'
