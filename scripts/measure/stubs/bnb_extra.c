/* CUDA managed memory for the stub-cuda method, as bitsandbytes' paged optimizers use it (measure_finetune.py).
 *
 * The stub runtime (cudart.c) has no cudaMallocManaged of its own: its weak "success" default leaves the returned
 * pointer unset, and bitsandbytes (cget_managed_ptr) wraps whatever it finds there in a NumPy array. This library
 * is loaded with RTLD_GLOBAL before the stubs, so its (unversioned) definitions win over the weak defaults for
 * every library that imports cudaMallocManaged@libcudart.so.13 (cudaMemPrefetchAsync keeps the
 * stub's default: success, no byte moves). It is built by measure_finetune.py, not build.py:
 * torch never calls these, only bitsandbytes does.
 *
 * Managed memory is host-addressable on a real GPU, so it is handed out from anonymous host mappings
 * (MAP_NORESERVE: pages no one touches cost nothing; kernels are no-ops and nothing writes them). The bytes are
 * counted here, outside PyTorch's counters, as they are outside them on a real GPU (nvidia-smi sees them when the
 * pages are resident on the device): vramfit_managed_bytes() and vramfit_managed_peak() read them.
 */
#include <stddef.h>
#include <sys/mman.h>

typedef int cudaError_t;
static size_t managed_live, managed_peak, managed_count;

cudaError_t cudaMallocManaged(void **p, size_t n, unsigned int flags) {
  (void)flags;
  size_t len = n ? (n + 4095) & ~(size_t)4095 : 4096;
  void *q = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (q == MAP_FAILED) { *p = NULL; return 2; /* cudaErrorMemoryAllocation */ }
  *p = q;
  managed_live += n;
  managed_count += 1;
  if (managed_live > managed_peak) managed_peak = managed_live;
  return 0;
}

size_t vramfit_managed_bytes(void) { return managed_live; }
size_t vramfit_managed_peak(void) { return managed_peak; }
size_t vramfit_managed_count(void) { return managed_count; }
