/* A stand-in for the few CUDA runtime and driver queries that PyTorch's autograd engine makes when it runs a
 * backward pass over fake CUDA tensors on a machine with no GPU. No kernel and no allocation ever reaches it:
 * FakeTensorMode computes shapes and dtypes only. Built and preloaded by scripts/measure/measure.py.
 * The runtime symbols override libcudart through LD_PRELOAD; the driver symbols are exported under the name
 * libcuda.so.1 so that PyTorch's lazy driver loader finds them. */
#include <string.h>
#include <cuda_runtime_api.h>

static int stub_major = 9, stub_minor = 0; /* compute capability: H100 (sm_90) unless VRAMFIT_STUB_CC says otherwise */
static void stub_cc(void) {
  extern char *getenv(const char *);
  const char *cc = getenv("VRAMFIT_STUB_CC");
  if (cc && cc[0] >= '0' && cc[0] <= '9') { stub_major = cc[0] - '0'; stub_minor = cc[1] >= '0' && cc[1] <= '9' ? cc[1] - '0' : 0; }
}

cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { (void)d; return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDeviceGetStreamPriorityRange(int *lo, int *hi) { if (lo) *lo = 0; if (hi) *hi = -5; return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d) {
  (void)d; stub_cc(); memset(p, 0, sizeof *p);
  strcpy(p->name, "vramfit fake CUDA device");
  p->major = stub_major; p->minor = stub_minor;
  p->totalGlobalMem = (size_t)80 << 30; p->multiProcessorCount = 132; p->warpSize = 32;
  p->maxThreadsPerBlock = 1024; p->sharedMemPerBlock = 48 << 10; p->sharedMemPerBlockOptin = 227 << 10;
  p->sharedMemPerMultiprocessor = 228 << 10; p->regsPerBlock = 65536; p->maxThreadsPerMultiProcessor = 2048;
  p->l2CacheSize = 50 << 20; p->memoryBusWidth = 5120;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
  (void)d; stub_cc();
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = stub_major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = stub_minor; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 << 10; break;
    default: *v = 0;
  }
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithPriority(cudaStream_t *s, unsigned f, int pr) { (void)f; (void)pr; *s = (cudaStream_t)0; return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) { (void)f; *s = (cudaStream_t)0; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { (void)s; return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *st) { (void)s; *st = cudaStreamCaptureStatusNone; return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *f, size_t *t) { *f = (size_t)80 << 30; *t = (size_t)80 << 30; return cudaSuccess; }

/* Driver API (libcuda.so.1). */
typedef int CUresult;
CUresult cuDevicePrimaryCtxGetState(int dev, unsigned *flags, int *active) { (void)dev; *flags = 0; *active = 0; return 0; }
CUresult cuInit(unsigned f) { (void)f; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { *d = o; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = 0; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "vramfit stub"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "VRAMFIT_STUB"; return 0; }

/* Driver functions that Triton's launcher utilities link against (torch.compile without a GPU). Kernels are
 * never really loaded or launched: measure.py replaces Inductor's kernel runner with a no-op. */
static char stub_handle[64];
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxSetCurrent(void *c) { (void)c; return 0; }
CUresult cuCtxGetLimit(size_t *v, int l) { (void)l; *v = 0; return 0; }
CUresult cuCtxSetLimit(int l, size_t v) { (void)l; (void)v; return 0; }
CUresult cuDeviceGetAttribute(int *v, int a, int d) { (void)a; (void)d; *v = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { (void)d; *c = stub_handle; return 0; }
CUresult cuFuncGetAttribute(int *v, int a, void *f) { (void)a; (void)f; *v = 0; return 0; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return 0; }
CUresult cuFuncSetCacheConfig(void *f, int c) { (void)f; (void)c; return 0; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { (void)m; (void)n; *f = stub_handle; return 0; }
CUresult cuModuleLoadData(void **m, const void *img) { (void)img; *m = stub_handle; return 0; }
CUresult cuModuleUnload(void *m) { (void)m; return 0; }
CUresult cuPointerGetAttribute(void *d, int a, unsigned long long p) { (void)d; (void)a; (void)p; return 0; }
CUresult cuStreamIsCapturing(void *s, int *st) { (void)s; *st = 0; return 0; }
