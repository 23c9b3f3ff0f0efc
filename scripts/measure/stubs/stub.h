/* What the stub libraries share: the one simulated device, owned by the driver stub (libcuda.so.1). */
#ifndef VRAMFIT_STUB_H
#define VRAMFIT_STUB_H
#include <stdint.h>

/* The CUDA version the stubs claim for the driver and the runtime: 13.0, what torch 2.15's cu13 wheels need. */
#define STUB_CUDA_VERSION 13000

struct stub_device {
  char name[256];
  int major, minor, sms, threads_per_sm;
  uint64_t mem, used, smem_per_sm, smem_optin, l2;
  uintptr_t va_base, va_size, va_next;
};

struct stub_device *stub_dev(void);
int stub_is_device_ptr(const void *p);
uintptr_t stub_reserve(uint64_t bytes, uint64_t align);
int stub_take(uint64_t bytes);
void stub_give(uint64_t bytes);
int stub_attribute(int a);
void *stub_driver_symbol(const char *name);
#endif
